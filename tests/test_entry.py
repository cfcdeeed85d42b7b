"""run_cli, the way every step's `__main__` ends: a finished run leaves with exit code 0 after Python's exit
handlers ran and buffered output was delivered; a UserError is one line on stderr and exit code 2."""
import os
import subprocess
import sys

from conftest import REPO

SCRIPT = """
import atexit, sys
from alpaca_rlhf.deepspeed_chat.training.utils.entry import run_cli
from alpaca_rlhf.deepspeed_chat.training.utils.errors import ConfigError, UserError

def main():
    atexit.register(lambda: open(sys.argv[2], "w").write("exit handler ran"))
    sys.stdout.write("buffered, no newline")  # still in the buffer when the process ends
    if sys.argv[1] == "fail":
        raise UserError("--flag: expected a number, got 'x'")
    if sys.argv[1] == "flags":
        raise ConfigError("--flag must be at least 1, got 0")

run_cli(main)
"""


def run(tmp_path, mode, rank="0"):
    return subprocess.run([sys.executable, "-c", SCRIPT, mode, str(tmp_path / "handler.txt")], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, RANK=rank))


def test_finished_run_flushes_output_and_runs_exit_handlers(tmp_path):
    proc = run(tmp_path, "ok")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("buffered, no newline")
    assert (tmp_path / "handler.txt").read_text() == "exit handler ran"


def test_user_error_is_one_line_and_exit_code_2(tmp_path):
    proc = run(tmp_path, "fail")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --flag: expected a number, got 'x'"
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "handler.txt").read_text() == "exit handler ran"


def test_an_error_on_another_rank_is_printed_there_unless_every_rank_raises_it(tmp_path):
    proc = run(tmp_path, "fail", rank="1")  # a data or file error may happen on rank 1 alone
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error (rank 1): --flag: expected a number, got 'x'"
    proc = run(tmp_path, "flags", rank="1")  # a flag error: every rank raises it, rank 0 says it
    assert proc.returncode == 2 and "error" not in proc.stderr

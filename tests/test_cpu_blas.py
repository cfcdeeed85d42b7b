"""alpaca_rlhf/cpu_blas.py: when the MKL vendor correction applies, that its shim builds and answers, and (on an
AMD processor, where it matters) that a process importing alpaca_rlhf before torch gets MKL's AVX-512 branch
and still computes correct products."""
import ctypes
import json
import os
import shutil
import subprocess
import sys

import pytest

from alpaca_rlhf import cpu_blas

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAN_BUILD = sys.platform.startswith("linux") and shutil.which(os.environ.get("CC") or "cc") is not None


@pytest.fixture
def keep_status():
    before = cpu_blas.STATUS
    yield
    cpu_blas.STATUS = before


def test_cpu_vendor_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n")
    assert cpu_blas.cpu_vendor(str(info)) == "AuthenticAMD"
    assert cpu_blas.cpu_vendor(str(tmp_path / "missing")) == ""


def test_apply_decides_by_switch_vendor_and_import_order(monkeypatch, keep_status, tmp_path):
    monkeypatch.setenv(cpu_blas.ENV_SWITCH, "0")
    assert cpu_blas.apply(vendor="AuthenticAMD", directory=str(tmp_path)).startswith("off")
    monkeypatch.setenv(cpu_blas.ENV_SWITCH, "1")
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        assert cpu_blas.apply(vendor="GenuineIntel", directory=str(tmp_path)) == "not needed (GenuineIntel processor)"
        import torch  # noqa: F401  (this test process has loaded torch already: too late to correct it)
        status = cpu_blas.apply(vendor="AuthenticAMD", directory=str(tmp_path))
        assert status == "not applied: torch was imported before alpaca_rlhf"
        assert cpu_blas.STATUS == status
    assert not list(tmp_path.iterdir())  # nothing was built for processes that do not need it


@pytest.mark.skipif(not CAN_BUILD, reason="the shim is a Linux shared library built with the system's C compiler")
def test_shim_builds_once_and_answers_intel(tmp_path):
    path = cpu_blas.build_shim(str(tmp_path))
    assert os.path.basename(path).startswith("mkl_vendor_shim-") and path.endswith(".so")
    assert getattr(ctypes.CDLL(path), cpu_blas.SYMBOL)() == 1
    stamp = os.stat(path).st_mtime_ns
    assert cpu_blas.build_shim(str(tmp_path)) == path and os.stat(path).st_mtime_ns == stamp  # cached
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]  # no build leftovers


def test_shim_without_compiler_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="no-such-cc"):
        cpu_blas.build_shim(str(tmp_path), compiler="no-such-cc")


_PROBE = """
import json, alpaca_rlhf, torch
from alpaca_rlhf import cpu_blas
torch.manual_seed(0)
a, b = torch.randn(300, 200), torch.randn(200, 100)
err = ((a @ b).double() - a.double() @ b.double()).abs().max().item()
print(json.dumps({"status": cpu_blas.STATUS, "branch": cpu_blas.mkl_code_branch(), "err": err}))
"""


def _probe(fix: str, cache: str) -> dict:
    env = dict(os.environ, **{cpu_blas.ENV_SWITCH: fix, "XDG_CACHE_HOME": cache,
                              "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(cpu_blas.cpu_vendor() not in ("AuthenticAMD", "HygonGenuine") or not CAN_BUILD,
                    reason="the correction only acts on AMD processors, with a C compiler to build its shim")
def test_amd_process_gets_mkl_avx512_branch_and_correct_products(tmp_path):
    stock, corrected = _probe("0", str(tmp_path)), _probe("1", str(tmp_path))
    if stock["branch"] is None:
        pytest.skip("this torch build has no MKL")
    assert stock["status"].startswith("off") and corrected["status"] == "applied"
    assert corrected["branch"] != stock["branch"]  # MKL took another kernel family
    if "avx512f" in open("/proc/cpuinfo").read():
        assert corrected["branch"] == 7  # MKL's AVX-512 branch
    for run in (stock, corrected):
        assert run["err"] < 1e-3  # fp32 products of 200 terms against float64

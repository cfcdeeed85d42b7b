"""The remote reward (--reward_model_type remote) over loopback: a real `alpaca_rlhf.tools.reward_server` process
serving the step-2 model, scores equal to the local reward model's as step 3 computes them, requests from
several threads batched together, refusals with the server's reason, and a server that dies: the client
stops with one line, and so does a step-3 run whose server dies mid-run, its checkpoint kept."""
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import torch

from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning.remote_reward import RemoteReward, RemoteRewardError
from alpaca_rlhf.deepspeed_chat.training.utils.data.prompt_format import format_answer
from alpaca_rlhf.deepspeed_chat.training.utils.data.token_ids import bos_ids, text_ids
from alpaca_rlhf.tools.evaluate_demo import load_prompts, load_reward_model
from conftest import REPO, RM_STATIC, STEP3, run_launcher
from test_critic_free_e2e import critic_free_args
from test_step3_e2e import metrics

pytestmark = pytest.mark.slow

ANSWERS = ["The answer is 4.", "I do not know.", "Paris, of course, is the capital.", "", "Yes", "No, never."]


def start_server(model_dir, *flags, port=0):
    """A reward server process and its /score URL (it prints the port it got)."""
    proc = subprocess.Popen([sys.executable, "-m", "alpaca_rlhf.tools.reward_server", "--model", model_dir,
                             "--port", str(port), *map(str, flags)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        found = re.search(r"on (http://\S+/score)", line)
        if found:
            return proc, found.group(1)
    raise AssertionError(f"the reward server did not start (exit {proc.wait()})")


def step3_scores(model, tokenizer, prompts, answers):
    """The local reward model's end scores as step 3 computes them: left-padded prompts, answers with EOS."""
    rows = [(bos_ids(tokenizer) + text_ids(tokenizer, p), text_ids(tokenizer, format_answer(a)) if a else [])
            for p, a in zip(prompts, answers)]
    P = max(len(p) for p, _ in rows)
    A = max(len(a) for _, a in rows) + 1
    seq = torch.full((len(rows), P + A), tokenizer.pad_token_id)
    mask = torch.zeros_like(seq)
    for i, (p, a) in enumerate(rows):
        tokens = a + [tokenizer.eos_token_id]
        seq[i, P - len(p):P], seq[i, P:P + len(tokens)] = torch.tensor(p), torch.tensor(tokens)
        mask[i, P - len(p):P + len(tokens)] = 1
    with torch.no_grad():
        return model.forward_value(seq, mask, prompt_length=P)["chosen_end_scores"].float()


def test_the_server_scores_like_the_local_reward_model_and_fails_clearly(reward_run):
    critic, _, _ = reward_run
    prompts = (load_prompts(RM_STATIC, 3) * 2)[:len(ANSWERS)]
    server, url = start_server(critic, "--max_rows", 4, "--batch_size", 8, "--max_request_bytes", 20000)
    try:
        client = RemoteReward(url, timeout=30, retries=1, backoff=0.1)
        stats = json.load(open(os.path.join(critic, "reward_stats.json")))
        assert client.reward_stats == {"mean": stats["chosen_mean"], "std": stats["chosen_std"]}
        model, tokenizer = load_reward_model(critic, torch.device("cpu"))
        local = step3_scores(model, tokenizer, prompts, ANSWERS)
        remote = client(prompts, ANSWERS, [True] * len(ANSWERS))  # 6 rows: two requests of at most 4
        torch.testing.assert_close(remote, local, atol=1e-5, rtol=1e-5)

        results = {}  # four threads at once: the server batches them, each gets its own rows back
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, client(prompts[i:], ANSWERS[i:],
                                                                                     [True] * (6 - i))))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(4):
            torch.testing.assert_close(results[i], local[i:], atol=1e-5, rtol=1e-5)

        with pytest.raises(RemoteRewardError, match=r"refused the request \(HTTP 413\): .*--max_request_bytes"):
            client(["x" * 30000], ["y"], [True])
        bad = urllib.request.Request(url, data=json.dumps({"prompts": ["a"], "answers": []}).encode())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=30)
        assert refused.value.code == 400 and "expected one of each per row" in json.loads(refused.value.read())["error"]
    finally:
        server.kill()
        server.wait()
    with pytest.raises(RemoteRewardError, match=r"no answer after 2 tries .*is the reward server running"):
        client(prompts[:1], ANSWERS[:1], [True])


# Scores answers by length and, in the 2nd rollout (8 answers; evaluations send 2), kills the reward server
# whose pid the test wrote next to it: the run's next request to the server finds nobody there.
KILLING_REWARD = '''
import os, signal
here = os.path.dirname(__file__)
def reward(prompts, answers, **columns):
    pid_file, calls = os.path.join(here, "server.pid"), os.path.join(here, "calls")
    if os.environ.get("RANK", "0") == "0" and len(answers) > 2 and os.path.exists(pid_file):
        n = int(open(calls).read()) + 1 if os.path.exists(calls) else 1
        open(calls, "w").write(str(n))
        if n == 2:
            os.kill(int(open(pid_file).read()), signal.SIGKILL)
    return [1.0 / (1.0 + len(a.split())) for a in answers]
'''


def test_a_run_whose_reward_server_dies_stops_with_one_line_and_keeps_its_checkpoint(reward_run, tmp_path):
    critic, actor, _ = reward_run
    (tmp_path / "killer.py").write_text(KILLING_REWARD)
    server, url = start_server(critic)
    (tmp_path / "server.pid").write_text(str(server.pid))
    out = tmp_path / "final"
    args = critic_free_args(actor, out, tmp_path / "data", "--advantage_estimator", "rloo",
                            "--reward_model_type", "remote", "function", "--reward_weights", 1.0, 0.5,
                            "--reward_url", url, "--reward_function", f"{tmp_path / 'killer.py'}:reward",
                            "--reward_retries", 1, "--actor_lora_dim", 8, "--actor_lora_module_name", "q_proj",
                            "--only_optimize_lora")
    args[args.index("--save_interval") + 1] = 1
    args[args.index("--test_stop_step") + 1] = 3
    try:
        died = run_launcher(STEP3, args, num_gpus=1, check=False)
    finally:
        server.kill()
        server.wait()
    assert died.returncode != 0
    line = rf"error(?: \(rank \d\))?: --reward_url {re.escape(url)}: no answer after 2 tries"
    assert re.search(line, died.stderr), died.stderr[-3000:]
    assert "Traceback" not in died.stderr
    # the first iteration trained on both sources, each logged, and its checkpoint is complete (a restarted run
    # resumes from it once the server is back: resuming itself is tested in test_step3_e2e and test_multinode_e2e)
    rows = metrics(str(out))
    assert 1 in rows and "reward/raw_remote" in rows[1] and "reward/raw_function" in rows[1]
    assert (out / "checkpoints" / "step_1" / "trainer_state.json").exists() and not (out / "actor").exists()

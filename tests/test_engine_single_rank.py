"""The training engine on one rank (a plain `python` run sets up its own world): DeepSpeed's step must equal a
plain torch AdamW step with the same gradient clipping, with and without ZeRO, and without ZeRO the pointless
self all-reduce of the gradients is switched off."""
import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import copy, sys, types, torch
from alpaca_rlhf.deepspeed_chat.training.utils.distributed import init_distributed
from alpaca_rlhf.deepspeed_chat.training.utils.train_utils import EngineSpec, init_engine, train_ds_config
init_distributed()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
reference, initial = copy.deepcopy(model), copy.deepcopy(model)
args = types.SimpleNamespace(world_size=1, offload=False, dtype="fp32", optimizer="torch_adamw",
                             adam_betas=(0.9, 0.95), lr_scheduler_type="constant", num_warmup_steps=0)
spec = EngineSpec(learning_rate=1e-2, weight_decay=0.0, zero_stage=int(sys.argv[1]))
engine = init_engine(model, spec, args, train_ds_config(spec, args, 4, 1), total_steps=3)
optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
for _ in range(3):
    x = 3 * torch.randn(4, 8)  # large enough inputs that the clipping at norm 1 takes effect
    engine.backward(engine(x).pow(2).mean())
    engine.step()
    reference(x).pow(2).mean().backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
for ours, plain, start in zip(engine.module.parameters(), reference.parameters(), initial.parameters()):
    assert not torch.equal(ours.detach(), start.detach())  # trained
    torch.testing.assert_close(ours.detach(), plain.detach(), rtol=1e-5, atol=1e-6)
print("self all-reduce:", engine.enable_backward_allreduce)
'''


@pytest.mark.parametrize("zero_stage, allreduce", [(0, False), (2, True)])
def test_one_rank_engine_step_equals_plain_adamw(zero_stage, allreduce):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(zero_stage)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"self all-reduce: {allreduce}" in proc.stdout

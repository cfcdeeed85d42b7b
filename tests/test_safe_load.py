"""Weights-only loading of DeepSpeed checkpoints (training/utils/safe_load.py): checkpoints saved with ZeRO 0, 1, 2
and 3 (fp32 and bf16, torch AdamW, transformers' cosine schedule) load back exactly under
weights_only_checkpoint_loading, and a checkpoint file tampered to hold a pickled object of a class outside the
allowlist is refused with an error naming the file, without that object being built.

The engines need a one-rank world (gloo on the CPU accelerator): all of that runs in one subprocess (as in
test_engine_single_rank.py), which reports one line per case; the tests read them."""
import os
import pickle
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import copy, os, shutil, sys, tempfile, traceback, types
import torch
import deepspeed
import deepspeed.runtime.engine as ds_engine
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from alpaca_rlhf.deepspeed_chat.training.utils.distributed import init_distributed
from alpaca_rlhf.deepspeed_chat.training.utils.train_utils import EngineSpec, init_engine, train_ds_config
from alpaca_rlhf.deepspeed_chat.training.utils.safe_load import (UnsafeCheckpointError,
                                                                 weights_only_checkpoint_loading)

init_distributed()
ROOT = tempfile.mkdtemp(prefix="safe_load_")
MARKER = os.path.join(ROOT, "planted_object_was_built")


def _build_marker(path):
    open(path, "w").close()


class Planted:
    """Unpickling it runs code: creates MARKER (a stand-in for anything an attacker would run)."""
    def __reduce__(self):
        return (_build_marker, (MARKER,))


def make_engine(stage, dtype, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 1))
    model[0].bias.requires_grad_(False)  # a frozen parameter, as LoRA runs have (frozen_param_* entries)
    args = types.SimpleNamespace(world_size=1, offload=False, dtype=dtype, optimizer="torch_adamw",
                                 adam_betas=(0.9, 0.95), lr_scheduler_type="cosine", num_warmup_steps=1)
    spec = EngineSpec(learning_rate=1e-2, weight_decay=0.1, zero_stage=stage)
    return init_engine(model, spec, args, train_ds_config(spec, args, 4, 1), total_steps=8)


def train(engine, dtype, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 8, generator=g).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()


def params(engine):
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # a no-op below ZeRO-3
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(map(str, a)), sorted(map(str, b)))
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):  # LossScaler, fragment_address
        assert type(a) is type(b), where
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, (where, a, b)


def snapshot(x):
    """A copy of a state dict (copy.deepcopy refuses the flat-buffer views in ZeRO's state)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return type(x)((k, snapshot(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(snapshot(v) for v in x)
    return copy.deepcopy(x)


def state(engine):
    return snapshot({"optimizer": engine.optimizer.state_dict(), "lr_scheduler": engine.lr_scheduler.state_dict(),
                     "global_steps": engine.global_steps})


def save(stage, dtype):
    engine = make_engine(stage, dtype, seed=0)
    train(engine, dtype, 3, seed=1)
    path = os.path.join(ROOT, f"z{stage}_{dtype}")
    engine.save_checkpoint(path, tag="state")
    return engine, path


def case_roundtrip(stage, dtype):
    saved, path = save(stage, dtype)
    saved_params, saved_state = params(saved), state(saved)
    fresh = make_engine(stage, dtype, seed=123)  # other weights: the load has to bring them back
    assert any(not torch.equal(saved_params[n], p) for n, p in params(fresh).items())
    checkpoint_engine = fresh.checkpoint_engine
    with weights_only_checkpoint_loading(fresh):
        load_path, _ = fresh.load_checkpoint(path, tag="state", load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    assert load_path is not None
    assert fresh.checkpoint_engine is checkpoint_engine and "load" not in vars(checkpoint_engine)  # restored
    assert checkpoint_engine.load.__func__ is TorchCheckpointEngine.load
    loaded_params = params(fresh)
    for name, value in saved_params.items():
        assert torch.equal(loaded_params[name], value), name
    assert_same(saved_state, state(fresh))
    # the restored optimizer state (Adam moments, step, schedule) carries on exactly as the saved engine does
    train(saved, dtype, 1, seed=2)
    train(fresh, dtype, 1, seed=2)
    for name, value in params(saved).items():
        assert torch.equal(params(fresh)[name], value), name
    files = sorted(os.listdir(os.path.join(path, "state")))
    return f"{len(files)} files: {' '.join(files)}"


def tamper(src, name):
    dst = os.path.join(ROOT, f"tampered_{os.path.basename(src)}_{name.split('_')[0]}")
    shutil.copytree(src, dst)
    file = os.path.join(dst, "state", name)
    sd = torch.load(file, weights_only=False)  # our own trusted file
    sd["planted"] = Planted()
    torch.save(sd, file)
    return dst, file


def case_tampered(name):
    _, path = save(2, "fp32")
    tampered, file = tamper(path, name)
    # without weights-only loading DeepSpeed would run the planted code while reading the file
    plain = make_engine(2, "fp32", seed=5)
    try:
        plain.load_checkpoint(tampered, tag="state")
    except Exception:
        pass
    assert os.path.exists(MARKER), "the tampered file does not plant anything"
    os.remove(MARKER)
    fresh = make_engine(2, "fp32", seed=5)
    try:
        with weights_only_checkpoint_loading(fresh):
            fresh.load_checkpoint(tampered, tag="state", load_optimizer_states=True, load_lr_scheduler_states=True)
    except UnsafeCheckpointError as e:
        message = str(e)
    else:
        raise AssertionError("the tampered checkpoint was loaded")
    assert file in message and "__main__._build_marker" in message, message
    assert not os.path.exists(MARKER), "the planted object was built"
    assert "load" not in vars(fresh.checkpoint_engine)  # restored after the error too
    return message.splitlines()[0][:200]


def case_zero3_without_optimizer_states():
    _, path = save(3, "fp32")
    fresh = make_engine(3, "fp32", seed=5)
    original = ds_engine.get_fp32_state_dict_from_zero_checkpoint
    try:
        with weights_only_checkpoint_loading(fresh):
            fresh.load_checkpoint(path, tag="state", load_optimizer_states=False)
    except UnsafeCheckpointError as e:
        message = str(e)
    else:
        raise AssertionError("ZeRO-3 without optimizer states loaded through zero_to_fp32")
    assert ds_engine.get_fp32_state_dict_from_zero_checkpoint is original
    return message[:120]


CASES = {
    "roundtrip_zero0_fp32": lambda: case_roundtrip(0, "fp32"),
    "roundtrip_zero1_fp32": lambda: case_roundtrip(1, "fp32"),
    "roundtrip_zero2_fp32": lambda: case_roundtrip(2, "fp32"),
    "roundtrip_zero3_fp32": lambda: case_roundtrip(3, "fp32"),
    "roundtrip_zero0_bf16": lambda: case_roundtrip(0, "bf16"),
    "roundtrip_zero2_bf16": lambda: case_roundtrip(2, "bf16"),
    "roundtrip_zero3_bf16": lambda: case_roundtrip(3, "bf16"),
    "tampered_model_states": lambda: case_tampered("mp_rank_00_model_states.pt"),
    "tampered_optim_states": lambda: case_tampered("zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    "zero3_without_optimizer_states": case_zero3_without_optimizer_states,
}
for name, case in CASES.items():
    try:
        detail = case()
        print(f"CASE {name} PASS {detail}", flush=True)
    except BaseException:
        print(f"CASE {name} FAIL " + traceback.format_exc().replace(chr(10), " | "), flush=True)
shutil.rmtree(ROOT, ignore_errors=True)
'''

CASE_NAMES = ["roundtrip_zero0_fp32", "roundtrip_zero1_fp32", "roundtrip_zero2_fp32", "roundtrip_zero3_fp32",
              "roundtrip_zero0_bf16", "roundtrip_zero2_bf16", "roundtrip_zero3_bf16", "tampered_model_states",
              "tampered_optim_states", "zero3_without_optimizer_states"]


@pytest.fixture(scope="module")
def engine_cases():
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a world of its own
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env,
                          cwd=REPO)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            _, name, verdict, *detail = line.split(" ", 3)
            results[name] = (verdict, detail[0] if detail else "")
    assert results, f"no case ran ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return results


@pytest.mark.parametrize("case", CASE_NAMES)
def test_engine_checkpoints(engine_cases, case):
    verdict, detail = engine_cases.get(case, ("MISSING", "the case did not run"))
    assert verdict == "PASS", detail


BUILT = []


def _record_build(what):
    BUILT.append(what)


class _Planted:
    """Unpickling it runs code (appends to BUILT)."""
    def __reduce__(self):
        return (_record_build, ("built",))


def test_plain_file_with_unlisted_global_is_refused(tmp_path):
    from alpaca_rlhf.deepspeed_chat.training.utils.errors import UserError
    from alpaca_rlhf.deepspeed_chat.training.utils.safe_load import UnsafeCheckpointError, weights_only_load
    file = str(tmp_path / "mp_rank_00_model_states.pt")
    torch.save({"module": {"w": torch.ones(2)}, "extra": _Planted()}, file)
    with pytest.raises(UnsafeCheckpointError) as info:
        weights_only_load(file)
    assert file in str(info.value) and "._record_build" in str(info.value)
    assert isinstance(info.value, UserError) and isinstance(info.value, pickle.UnpicklingError)
    assert BUILT == []
    # legacy (non-zip) serialization, DeepSpeed's checkpoint_serialization=false: refused the same way
    torch.save({"extra": _Planted()}, file, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError) as info:
        weights_only_load(file)
    assert file in str(info.value) and "._record_build" in str(info.value), str(info.value)
    assert BUILT == []


def test_allowlisted_deepspeed_objects_round_trip(tmp_path):
    """The fp16 dynamic loss scaler (GPU runs; no fp16 on the CPU accelerator) and the other allowlisted
    objects, as DeepSpeed makes them, load back with their attributes."""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    from alpaca_rlhf.deepspeed_chat.training.utils.safe_load import weights_only_load
    from deepspeed.runtime.precision_config import DeepSpeedFP16Config
    fp16 = DeepSpeedFP16Config(enabled=True, loss_scale_window=100, initial_scale_power=16)  # as ds_utils sets it
    dynamic = CreateLossScaler(dtype=torch.half, static_loss_scale=0, dynamic_scaling=True,
                               dynamic_loss_args=fp16.dynamic_loss_scale_args())
    static = CreateLossScaler(dtype=torch.bfloat16, static_loss_scale=0, dynamic_scaling=False, dynamic_loss_args=None)
    saved = {"loss_scaler": dynamic, "static": static, "zero_stage": ZeroStageEnum.gradients,
             "param_slice_mappings": [{"w": fragment_address(numel=4, start=8)}]}
    file = str(tmp_path / "optim_states.pt")
    torch.save(saved, file)
    loaded = weights_only_load(file, map_location="cpu")
    assert type(loaded["loss_scaler"]) is type(dynamic) and vars(loaded["loss_scaler"]) == vars(dynamic)
    assert type(loaded["static"]) is type(static) and vars(loaded["static"]) == vars(static)
    assert loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["param_slice_mappings"][0]["w"] == fragment_address(numel=4, start=8)
    # nothing leaks out: outside weights_only_load torch's own allowlist is unchanged
    with pytest.raises(pickle.UnpicklingError):
        torch.load(file, weights_only=True)

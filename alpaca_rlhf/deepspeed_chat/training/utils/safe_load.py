"""Weights-only loading of DeepSpeed checkpoints (DeepSpeed 0.19.8, torch 2.13).

DeepSpeed reads every file of a checkpoint with `torch.load(..., weights_only=False)`, i.e. it unpickles
whatever OUTPUT_DIR/checkpoints holds: a planted or tampered `*.pt` file runs arbitrary code on resume. Here
the same files are read with `torch.load(..., weights_only=True)` and an explicit allowlist of the few
non-tensor globals DeepSpeed really stores; a file holding anything else is refused with UnsafeCheckpointError
(which names the file and the offending globals) and nothing from it is unpickled.

Usage (every engine that loads inside the block; the engines' own checkpoint engines are used, so nothing
global changes):

    with weights_only_checkpoint_loading(actor_engine, critic_engine):
        actor_engine.load_checkpoint(dir, tag="state", load_optimizer_states=True, load_lr_scheduler_states=True)
        ...

    weights_only_load(path, map_location=None)   the loader itself, for one file

How: in DeepSpeed 0.19.8 every file that `DeepSpeedEngine.load_checkpoint` reads on the paths this project uses
goes through the engine's `checkpoint_engine.load(path, map_location)`:
  - `mp_rank_XX_model_states.pt` / `zero_pp_rank_X_mp_rank_XX_model_states.pt` (module, and below ZeRO the
    optimizer state; lr scheduler; counters) through `SDLoaderFactory.get_sd_loader(..., checkpoint_engine)`
    in `_load_checkpoint`;
  - `[bf16_]zero_pp_rank_X_mp_rank_XX_optim_states.pt` (ZeRO 1, 2, 3) in `_get_all_zero_checkpoint_state_dicts`;
  - MoE expert files and the pipeline engine's layer files also get the engine's checkpoint engine.
The ZeRO optimizers' `load_state_dict` (stage_1_and_2.py, stage3.py, bf16_optimizer.py) only receive the
already-loaded dicts on these paths. So the context manager shadows `load` on each engine's checkpoint-engine
object (an instance attribute, removed on exit) with `weights_only_load`. That works for DeepSpeed's default
TorchCheckpointEngine and the Fast/Decoupled engines (whose `load` is also a plain `torch.load` of the path);
any other checkpoint engine (DataStates, a subclass with its own `load`) is refused up front.

Where DeepSpeed still bypasses the checkpoint engine (direct `torch.load(..., weights_only=False)` calls that
cannot be redirected without patching `torch.load` for everybody), and what happens under this context manager:
  - Universal checkpoints (config `checkpoint.load_universal`): `load_hp_checkpoint_state_from_checkpoint_dir`
    in runtime/base_optimizer.py (ZeRO 1/2, bf16 optimizer) and `load_hp_checkpoint_state_from_checkpoint_dir_
    stage3` / `load_hp_checkpoint_state` in runtime/zero/stage3.py load zero/*.pt themselves. An engine
    configured that way is refused on entry (UnsafeCheckpointError).
  - ZeRO-3 with `load_optimizer_states=False` (and no MoE): `_load_checkpoint` rebuilds the module from
    `deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`, which calls `torch.load(...,
    weights_only=False)` on every rank's optim_states file. Inside the block the name `runtime.engine` uses is
    replaced by a function that raises UnsafeCheckpointError (restored on exit); this project always loads with
    `load_optimizer_states=True`.
  - Offline tools, never called by `load_checkpoint`: deepspeed/checkpoint/* (ds_to_universal, DeepSpeedCheckpoint,
    reshape, autoep_universal) and utils/zero_to_fp32.py as a script. Not covered.
  - NVMe optimizer offload copies raw swap files (no unpickling) and is unaffected.
The rest of a project checkpoint (checkpoint.py) is JSON and safetensors: no pickle at all.

The allowlist (DEEPSPEED_CHECKPOINT_GLOBALS), found by saving real checkpoints with ZeRO 0/1/2/3, fp32 and bf16,
torch AdamW and transformers' schedulers (`torch.serialization.get_unsafe_globals_in_checkpoint` lists nothing
else; tensors, torch.Size, dtypes, OrderedDict and plain containers are allowed by torch already):
  - deepspeed.runtime.zero.config.ZeroStageEnum: `zero_stage` in the ZeRO optimizer state (ZeRO 1/2/3), an
    IntEnum, rebuilt as ZeroStageEnum(value).
  - deepspeed.runtime.fp16.loss_scaler.LossScaler: `loss_scaler` in the ZeRO optimizer state, a static scaler
    (fp32 and bf16: scale 1.0); restored from its attributes `cur_scale`, `dynamic`.
  - deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler: the same entry with fp16 and dynamic loss scaling
    (the GPU default `--dtype auto`); attributes are numbers, bools and a torch dtype. Not producible on the CPU
    accelerator (no fp16); the object DeepSpeed's CreateLossScaler makes for fp16 is round-tripped in the tests.
  - deepspeed.utils.tensor_fragment.fragment_address: `param_slice_mappings` in the ZeRO 1/2 (and bf16
    optimizer) state, a dataclass (numel, start) per parameter.
Below ZeRO (stage 0), fp32 or bf16, the files hold no global outside torch's defaults. The optimizers' own state
(torch AdamW, DeepSpeed's FusedAdam / DeepSpeedCPUAdam, which keep torch.optim.Optimizer's state_dict) is
tensors, numbers, strings and tuples (DeepSpeedCPUAdam checked once by hand with ZeRO 0 and ZeRO-Offload 2 and
3: same globals, exact resume; the tests use torch AdamW, which needs no JIT-compiled op). Allowing a class lets
a pickle construct it with arguments of its choosing (a weights-only unpickler calls allowlisted classes): all
four are plain value holders.
Note: `torch.serialization.safe_globals` removes its globals on exit, including any a caller had added
globally before.
"""
import contextlib
import pickle
import re
from typing import Iterator, List

import deepspeed.runtime.engine as ds_engine
import torch
from deepspeed.runtime.checkpoint_engine.decoupled_checkpoint_engine import DecoupledCheckpointEngine
from deepspeed.runtime.checkpoint_engine.fast_checkpoint_engine import FastCheckpointEngine
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from .errors import UserError

DEEPSPEED_CHECKPOINT_GLOBALS = (ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address)
_ALLOWED_NAMES = ", ".join(f"{g.__module__}.{g.__qualname__}" for g in DEEPSPEED_CHECKPOINT_GLOBALS)

# Checkpoint engines whose `load(path, map_location)` is nothing but `torch.load` of the path
_PLAIN_TORCH_LOADERS = (TorchCheckpointEngine.load, FastCheckpointEngine.load, DecoupledCheckpointEngine.load)


class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
    """A checkpoint file holds a global outside the allowlist, or a load would bypass weights-only loading."""


def _unlisted_globals(path) -> List[str]:
    """The globals in `path` that neither torch nor the allowlist accept (call with the allowlist active)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint (legacy format), unreadable: the unpickler's message says it
        return []


def _refusal_reason(error: Exception) -> str:
    """The weights-only unpickler's own reason, without torch's advice to load with weights_only=False."""
    text = str(error)
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("Check the documentation")]
    reason = found.group(1) if found else lines[-1] if lines else type(error).__name__
    return reason.split(" Please use `torch.serialization")[0].strip()[:300]


def weights_only_load(path, map_location=None):
    """`torch.load(path, map_location, weights_only=True)` with DeepSpeed's globals allowed; raises
    UnsafeCheckpointError naming the file when it holds anything else."""
    with torch.serialization.safe_globals(list(DEEPSPEED_CHECKPOINT_GLOBALS)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            unlisted = _unlisted_globals(path)
            what = (f"globals outside the allowlist: {', '.join(unlisted)}" if unlisted
                    else f"content a weights-only load refuses ({_refusal_reason(e)})")
            raise UnsafeCheckpointError(
                f"{path}: refused to load this checkpoint file, it holds {what}. DeepSpeed checkpoints hold only "
                f"tensors, plain values and {_ALLOWED_NAMES}; the file was not written by this DeepSpeed version "
                f"or was tampered with") from e


def _refuse_zero_to_fp32(*args, **kwargs):
    raise UnsafeCheckpointError(
        "ZeRO-3 checkpoint loading without optimizer states goes through deepspeed.utils.zero_to_fp32, which "
        "unpickles with weights_only=False; load with load_optimizer_states=True under weights-only loading")


@contextlib.contextmanager
def weights_only_checkpoint_loading(*engines) -> Iterator[None]:
    """Within the block, `engine.load_checkpoint(...)` of each given DeepSpeed engine reads its files with
    `weights_only_load`; a load path that would unpickle with weights_only=False raises UnsafeCheckpointError.
    Everything is restored on exit."""
    if not engines:
        raise ValueError("weights_only_checkpoint_loading needs the DeepSpeed engines that will load")
    checkpoint_engines = []
    for engine in engines:
        if engine.load_universal_checkpoint():
            raise UnsafeCheckpointError(
                "universal checkpoints (config checkpoint.load_universal) are read by DeepSpeed's ZeRO optimizers "
                "with torch.load(weights_only=False), bypassing the checkpoint engine; not supported here")
        checkpoint_engine = engine.checkpoint_engine
        if getattr(type(checkpoint_engine), "load", None) not in _PLAIN_TORCH_LOADERS:
            raise UnsafeCheckpointError(
                f"{type(checkpoint_engine).__name__} loads checkpoints its own way; weights-only loading supports "
                f"DeepSpeed's Torch, Fast and Decoupled checkpoint engines")
        if all(ce is not checkpoint_engine for ce, _ in checkpoint_engines):  # engines may share one
            checkpoint_engines.append((checkpoint_engine, vars(checkpoint_engine).get("load")))
    zero_to_fp32 = ds_engine.get_fp32_state_dict_from_zero_checkpoint
    try:
        for checkpoint_engine, _ in checkpoint_engines:
            checkpoint_engine.load = weights_only_load
        ds_engine.get_fp32_state_dict_from_zero_checkpoint = _refuse_zero_to_fp32
        yield
    finally:
        ds_engine.get_fp32_state_dict_from_zero_checkpoint = zero_to_fp32
        for checkpoint_engine, previous in checkpoint_engines:
            if previous is None:
                vars(checkpoint_engine).pop("load", None)
            else:  # nested blocks: the outer one's loader
                checkpoint_engine.load = previous

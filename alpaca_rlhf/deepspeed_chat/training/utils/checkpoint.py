"""Resumable training checkpoints, separate from the exported HF model:

    OUTPUT_DIR/checkpoints/step_N/
        <engine>/            DeepSpeed engine state: module, optimizer, scheduler (one dir per engine)
        rng_rank{r}.json     python / numpy RNG states of rank r
        rng_rank{r}.safetensors   torch CPU (and accelerator) RNG states of rank r
        tensors.safetensors  tensors the trainer keeps beside its engines (the EMA of the actor), if any
        trainer_state.json   step, data position, KL controller, ... (whatever the trainer needs)
        config.json          the resolved run configuration
    OUTPUT_DIR/checkpoints/latest   name of the newest complete checkpoint

A checkpoint is written under a temporary name and renamed when every rank has finished (its files and
directory synced to disk first), and `latest` is replaced atomically after that, so a run killed at any moment
resumes from the last complete checkpoint. A `latest` that names a missing directory falls back to the newest
complete checkpoint, with a warning, instead of a silent restart from step 0.

Several nodes: when OUTPUT_DIR is on a shared filesystem, global rank 0 renames and points `latest`; when each
node has its own disk, every node keeps a complete copy of what its ranks need (DeepSpeed's node-local storage)
and its first rank does the renaming (`node_local`).

`RunCheckpoints` is what the steps use: resume at start, save every --save_interval steps.
"""
import json
import os
import random
import shutil
from typing import Dict, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import ConfigError
from .safe_load import weights_only_checkpoint_loading
from .utils import atomic_write, barrier, fsync_tree, is_local_rank_0, is_rank_0, print_rank_0, write_json

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"  # written last: a checkpoint directory with it is complete


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint, or None: the one `latest` names, else (a dangling or missing
    `latest`, with a warning) the complete step_N with the highest N."""
    root = checkpoint_root(output_dir)
    pointer = os.path.join(root, LATEST)
    if os.path.exists(pointer):
        path = os.path.join(root, open(pointer).read().strip())
        if os.path.isfile(os.path.join(path, TRAINER_STATE)):
            return path
    complete = sorted((int(d.split("_")[1]), d) for d in (os.listdir(root) if os.path.isdir(root) else [])
                      if d.startswith("step_") and d.split("_")[1].isdigit()
                      and os.path.isfile(os.path.join(root, d, TRAINER_STATE)))
    if not complete:
        if os.path.exists(pointer):
            print_rank_0(f"warning: {pointer} names no complete checkpoint and there is none: starting from step 0")
        return None
    path = os.path.join(root, complete[-1][1])
    print_rank_0(f"warning: {pointer} is missing or names no complete checkpoint; resuming from the newest "
                 f"complete one, {path}")
    return path


# Flags that may differ between a run and its resumption (how it is started, not what it computes)
RESUME_FREE = {"resume", "no_auto_resume", "resume_with_changes", "local_rank", "device", "disable_progress_bar",
               "print_answers", "print_answers_interval", "eval_interval", "eval_batches", "eval_samples",
               "save_interval", "save_total_limit", "enable_tensorboard", "tensorboard_path", "deepspeed",
               "deepspeed_config", "data_output_path", "print_loss", "enable_test_mode", "test_stop_step",
               "max_nonfinite_steps", "dist_timeout", "node_local_checkpoints"}


def config_changes(saved: dict, current: dict) -> Dict[str, tuple]:
    """{flag: (saved value, current value)} for the flags that changed since the checkpoint was written."""
    keys = (set(saved) | set(current)) - RESUME_FREE
    return {k: (saved.get(k), current.get(k)) for k in sorted(keys) if saved.get(k) != current.get(k)}


def check_resume_config(path: str, current: dict, allow_changes: bool):
    """Refuse to resume a checkpoint written with other flags (learning rate, batch, world size, ...) unless
    allowed: the result would be neither the old run nor a new one."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return
    saved = json.load(open(config_file))
    if saved.get("world_size", current.get("world_size")) != current.get("world_size"):
        # ZeRO's optimizer partitions and each rank's data position belong to one number of ranks
        raise ConfigError(f"{path} was written by {saved['world_size']} ranks and this run has "
                          f"{current['world_size']}; resume it with {saved['world_size']} ranks (or start afresh "
                          f"with --no_auto_resume or another --output_dir)")
    changes = config_changes(saved, json.loads(json.dumps(current, default=str)))
    if changes and not allow_changes:
        listed = ", ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise ConfigError(f"{path} was written with other flags ({listed}); resume with the same flags, or pass "
                          f"--resume_with_changes to continue anyway")
    if changes:
        print_rank_0(f"warning: resuming {path} with changed flags: {', '.join(changes)}")


def _rng_state() -> tuple:
    from deepspeed.accelerator import get_accelerator
    tensors = {"torch": torch.get_rng_state()}
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        tensors["accelerator"] = accel.get_rng_state()
    np_state = np.random.get_state()
    plain = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return plain, tensors


def _set_rng_state(plain: dict, tensors: dict):
    from deepspeed.accelerator import get_accelerator
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "accelerator" in tensors:
        get_accelerator().set_rng_state(tensors["accelerator"])


def save_checkpoint(output_dir: str, step: int, engines: Dict[str, object], trainer_state: dict,
                    run_config: dict, keep_last: int = 2, tensors: Optional[Dict[str, torch.Tensor]] = None,
                    node_local: bool = False) -> str:
    """Collective: every rank calls it. `tensors`: state beside the engines, the same on every rank (rank 0
    writes it). node_local: OUTPUT_DIR is not shared by the nodes; each node's first rank writes its own copy
    of the shared files. Returns the final checkpoint path."""
    root = checkpoint_root(output_dir)
    name = f"step_{step}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    writer = is_local_rank_0() if node_local else is_rank_0()
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a run killed while saving
        os.makedirs(tmp)
    barrier()
    for engine_name, engine in engines.items():
        engine.save_checkpoint(os.path.join(tmp, engine_name), tag="state")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    rng_plain, rng_tensors = _rng_state()
    write_json(os.path.join(tmp, f"rng_rank{rank}.json"), rng_plain)
    save_file(rng_tensors, os.path.join(tmp, f"rng_rank{rank}.safetensors"))
    barrier()
    if writer:
        if tensors:
            # (cloned: tied weights share storage, which safetensors will not write twice)
            save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()},
                      os.path.join(tmp, "tensors.safetensors"))
        write_json(os.path.join(tmp, "config.json"), run_config)
        write_json(os.path.join(tmp, TRAINER_STATE), trainer_state)
        fsync_tree(tmp)  # every file on disk before the rename makes the checkpoint complete
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_tree(root, files=False)
        with atomic_write(os.path.join(root, LATEST)) as f:
            f.write(name)
        _prune(root, keep_last, newest=name)
    barrier()
    return final


def _prune(root: str, keep_last: int, newest: str):
    if keep_last <= 0:
        return
    steps = sorted((int(d.split("_")[1]), d) for d in os.listdir(root)
                   if d.startswith("step_") and d.split("_")[1].isdigit())
    for _, d in steps[:-keep_last]:
        if d != newest:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def load_checkpoint(path: str, engines: Dict[str, object]) -> dict:
    """Restore engines and this rank's RNG; returns the trainer state saved with the checkpoint. DeepSpeed's
    files are read weights-only (safe_load.py): a tampered checkpoint is refused, not unpickled."""
    with weights_only_checkpoint_loading(*engines.values()):
        for engine_name, engine in engines.items():
            load_path, _ = engine.load_checkpoint(os.path.join(path, engine_name), tag="state",
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
            if load_path is None:
                raise FileNotFoundError(f"{path}/{engine_name}: no DeepSpeed checkpoint to resume from")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    rng_json = os.path.join(path, f"rng_rank{rank}.json")
    if os.path.exists(rng_json):  # absent when resuming on a different number of ranks
        _set_rng_state(json.load(open(rng_json)), load_file(os.path.join(path, f"rng_rank{rank}.safetensors")))
    return json.load(open(os.path.join(path, TRAINER_STATE)))


def load_checkpoint_tensors(path: str) -> Dict[str, torch.Tensor]:
    """The `tensors` saved with a checkpoint ({} when there were none)."""
    file = os.path.join(path, "tensors.safetensors")
    return load_file(file) if os.path.exists(file) else {}


class RunCheckpoints:
    """A step's resumable checkpoints: `resume()` once at start (collective), then `maybe_save(step, ...)` after
    each optimizer step (or PPO iteration). engines: {name: DeepSpeed engine}, saved and restored together."""

    def __init__(self, args, engines: Dict[str, object], run_config: dict):
        self.args, self.engines, self.run_config = args, engines, run_config
        self.path: Optional[str] = None  # the checkpoint resumed from

    def resume(self) -> Optional[dict]:
        """Restore the newest complete checkpoint (unless --no_auto_resume) and return its trainer state, or
        None to start from step 0."""
        args = self.args
        if args.no_auto_resume and not args.resume:
            return None
        self.path = latest_checkpoint(args.output_dir)
        if self.path is None:
            if args.resume:
                print_rank_0(f"--resume: no checkpoint in {checkpoint_root(args.output_dir)}, starting from step 0")
            return None
        check_resume_config(self.path, self.run_config, args.resume_with_changes)
        state = load_checkpoint(self.path, self.engines)
        print_rank_0(f"resumed from {self.path}: step {state['step']}")
        return state

    def tensors(self) -> Dict[str, torch.Tensor]:
        return load_checkpoint_tensors(self.path) if self.path else {}

    def maybe_save(self, step: int, trainer_state: dict, tensors: Optional[Dict[str, torch.Tensor]] = None):
        """A checkpoint when `step` is a multiple of --save_interval (0: never)."""
        if self.args.save_interval and step % self.args.save_interval == 0:
            save_checkpoint(self.args.output_dir, step, self.engines, {"step": step, **trainer_state},
                            self.run_config, keep_last=self.args.save_total_limit, tensors=tensors,
                            node_local=getattr(self.args, "node_local_checkpoints", False))

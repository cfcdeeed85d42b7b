"""Exports swapped into place whole (utils/export_swap.py): a kill -9 at any point of an export leaves the
previous export or the new one, never a mix, and never loses the files beside it (checkpoints, metrics, a
user's notes)."""
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO

from alpaca_rlhf.deepspeed_chat.training.utils.export_swap import TMP_MARK, recover_interrupted_swaps
from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import save_hf_format


def _weights(directory):
    """All tensors of an export (one file or shards)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def _previous_export(micro_model_dir, out):
    """An export in two shards, with a run's files and a user's file beside it."""
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    save_hf_format(model, AutoTokenizer.from_pretrained(micro_model_dir), str(out), max_shard_size="200KB")
    assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) > 1
    (out / "checkpoints" / "step_2").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_2")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "notes.txt").write_text("mine")
    return _weights(out)


def _assert_intact(out, expected):
    assert not any(TMP_MARK in n or n.endswith(".old") for n in os.listdir(out.parent)), os.listdir(out.parent)
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoints" / "latest").read_text() == "step_2"
    assert (out / "metrics.jsonl").exists()
    got = _weights(out)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    AutoModelForCausalLM.from_pretrained(str(out))  # loads: no stale shard, no missing file


def test_a_new_export_replaces_the_old_one_whole_and_keeps_what_is_beside_it(micro_model_dir, tmp_path):
    out = tmp_path / "actor"
    _previous_export(micro_model_dir, out)
    (tmp_path / f".actor{TMP_MARK}dead").mkdir()                 # left by a killed export (beside)
    (out / f"{TMP_MARK}dead").mkdir()                            # ... and by an older version (inside)
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save_hf_format(model, AutoTokenizer.from_pretrained(micro_model_dir), str(out))
    assert [n for n in os.listdir(out) if n.endswith(".safetensors")] == ["model.safetensors"]  # old shards gone
    _assert_intact(out, {k: v.contiguous() for k, v in model.state_dict().items() if k in _weights(out)})


# Runs an export of the micro model plus one in a fresh process and kills it (SIGKILL, no cleanup) at one point.
KILLER = r"""
import os, signal, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from alpaca_rlhf.deepspeed_chat.training.utils import export_swap
from alpaca_rlhf.deepspeed_chat.training.utils.model import model_utils
model_dir, out, where = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(model_dir)
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if where == "writing":  # half of the weights written
    def save(state, directory, **kw):
        open(os.path.join(directory, "model.safetensors"), "wb").write(b"half")
        die()
    model_utils.save_torch_state_dict = save
else:
    replace = os.replace
    def killing_replace(src, dst):
        if where == "moved_away" and export_swap.TMP_MARK in src:    # the old one renamed away, the new not in
            die()
        if where == "moving_back" and src.endswith(".old" + os.sep + "metrics.jsonl"):  # run files half moved
            die()
        replace(src, dst)
    export_swap.os.replace = killing_replace
model_utils.save_hf_format(model, AutoTokenizer.from_pretrained(model_dir), out)
"""


@pytest.mark.parametrize("where, survivor", [("writing", "old"), ("moved_away", "old"), ("moving_back", "new")])
def test_an_export_killed_at_any_point_leaves_the_old_or_the_new_one(micro_model_dir, tmp_path, where, survivor):
    out = tmp_path / "actor"
    old = _previous_export(micro_model_dir, out)
    proc = subprocess.run([sys.executable, "-c", KILLER, micro_model_dir, str(out), where], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    recover_interrupted_swaps(str(out))  # what the next step's start does
    if survivor == "old":
        _assert_intact(out, old)
    else:
        _assert_intact(out, {k: v + 1.0 for k, v in old.items()})

"""Whole-directory exports that a kill at any moment cannot leave half replaced.

An export is written complete into a sibling temporary directory, `PARENT/.NAME.tmp-export-XXXX`, and swapped
into place with renames:

    1. NAME -> .NAME.old           (the previous directory, kept until the swap is complete)
    2. .NAME.tmp-export-XXXX -> NAME
    3. the entries of .NAME.old that the previous export did not write (checkpoints/, metrics.jsonl,
       tensorboard/, a user's notes) are moved back into NAME, one rename each
    4. .NAME.old is removed

`export_manifest.json` in an export lists the top-level names it wrote, so step 3 can tell the old export's
files (dropped: a different shard count must not leave stale weights) from everything else (kept).
`recover_interrupted_swaps` finishes or undoes a swap that a kill interrupted; every step calls it for its
--output_dir before it reads anything there (a missing NAME after step 1 would otherwise hide its checkpoints).
"""
import glob
import json
import os
import shutil
import uuid

from .utils import fsync_tree, print_rank_0

MANIFEST = "export_manifest.json"
TMP_MARK = ".tmp-export-"
# weight files an export without a manifest (written before manifests existed) is taken to own
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")


def _sibling(final: str, suffix: str) -> str:
    final = os.path.abspath(final)
    return os.path.join(os.path.dirname(final), f".{os.path.basename(final)}{suffix}")


def new_export_dir(final: str) -> str:
    """A fresh temporary directory beside `final` (same filesystem, so the swap is a rename); what killed
    exports left is recovered or removed first."""
    recover_interrupted_swap(final)
    tmp = _sibling(final, TMP_MARK + uuid.uuid4().hex[:8])
    os.makedirs(tmp)
    return tmp


def _export_owned(directory: str) -> set:
    """Top-level names the export in `directory` wrote."""
    manifest = os.path.join(directory, MANIFEST)
    if os.path.isfile(manifest):
        return set(json.load(open(manifest))) | {MANIFEST}
    return {n for n in os.listdir(directory) if n.endswith(_WEIGHT_SUFFIXES)}


def _swap_in_place_needed(final: str) -> bool:
    """Directories that cannot be renamed away (the working directory, a mount point) get their files
    replaced one by one instead."""
    real = os.path.realpath(final)
    return real == os.path.realpath(os.getcwd()) or os.path.ismount(real)


def swap_into_place(tmp: str, final: str):
    """Make the complete export in `tmp` the directory `final` (steps 1-4 above)."""
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(sorted(os.listdir(tmp)), f)
    fsync_tree(tmp)
    final = os.path.abspath(final)
    if _swap_in_place_needed(final):
        _replace_files(tmp, final)
        return
    old = _sibling(final, ".old")
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_tree(os.path.dirname(final), files=False)
    recover_interrupted_swap(final)  # steps 3 and 4


def recover_interrupted_swaps(output_dir: str):
    """recover_interrupted_swap for `output_dir` and the exports inside it (step 3's actor, critic, ...)."""
    recover_interrupted_swap(output_dir)
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith(".") and name.endswith(".old"):
                recover_interrupted_swap(os.path.join(output_dir, name[1:-len(".old")]))


def recover_interrupted_swap(final: str):
    """Finish (the new export is in place) or undo (it is not) a swap that was interrupted; remove the
    temporaries of killed exports."""
    final = os.path.abspath(final)
    for stale in (glob.glob(glob.escape(_sibling(final, TMP_MARK)) + "*")
                  + glob.glob(os.path.join(glob.escape(final), TMP_MARK + "*"))):
        shutil.rmtree(stale, ignore_errors=True)
    old = _sibling(final, ".old")
    if not os.path.isdir(old):
        return
    if not os.path.isdir(final):  # killed between steps 1 and 2: the previous directory comes back whole
        os.replace(old, final)
        print_rank_0(f"warning: an interrupted export of {final} was undone; the previous one is in place")
        return
    owned = _export_owned(old)
    present = set(os.listdir(final))
    for name in sorted(os.listdir(old)):
        if name not in owned and name not in present:
            os.replace(os.path.join(old, name), os.path.join(final, name))
    fsync_tree(final, files=False)
    shutil.rmtree(old)


def _replace_files(tmp: str, final: str):
    """The fallback: the old export's files that the new one does not write are removed, the new files are
    renamed in one by one."""
    os.makedirs(final, exist_ok=True)
    for name in _export_owned(final) - set(os.listdir(tmp)):
        path = os.path.join(final, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    for name in sorted(os.listdir(tmp)):
        target = os.path.join(final, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(tmp, name), target)
    shutil.rmtree(tmp, ignore_errors=True)

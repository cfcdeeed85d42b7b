#!/usr/bin/env bash
# The wheels the lent GPU machines lack, gathered here (a machine with PyPI) into .whl/ for scripts/gpu_check.sh.
#
#   bash scripts/gpu_wheels.sh        # then run the GPU check with .whl carried (device tool: carry [".whl"])
#
# The GPU image (Python 3.12, CUDA torch, transformers, peft, tokenizers, safetensors, tensorboard, ...; no network)
# has no DeepSpeed and an older transformers. DeepSpeed is published as a source archive only: it is built into a
# pure-Python wheel here (its CUDA ops compile on first use on the GPU machine); hjson and pydantic (with
# pydantic-core for CPython 3.12, annotated-types, typing-inspection) are its needs the image lacks; transformers is
# this project's pin. About 18 MB. .whl/ is kept out of git through .git/info/exclude.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=.venv/bin/python
[ -x "$PY" ] || { echo "error: $PY missing: run make venv first" >&2; exit 2; }
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
DS=$(version deepspeed)
"$PY" -m pip download --quiet --no-deps --no-binary=:all: -d .whl/src "deepspeed==$DS"
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl .whl/src/deepspeed-"$DS".tar.gz
rm -rf .whl/src
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "hjson==$(version hjson)" "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
  "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)" \
  "transformers==$(version transformers)"
ls -la .whl
du -sh .whl

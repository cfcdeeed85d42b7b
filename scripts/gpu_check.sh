#!/usr/bin/env bash
# GPU check: the pipeline's steps on one GPU, in the precisions, ZeRO stages and LoRA / full fine-tuning
# settings the CPU test suite cannot reach. Meant to be run once, offline, on a lent GPU machine (one H100,
# no network). A time budget (BUDGET_S, 450 s) keeps it under 8 minutes: cases that no longer fit are skipped.
#
#   bash scripts/gpu_check.sh
#
# What it does:
#   0. Python: on the lent GPU machines (no network) the image's python3 with the wheels of .whl/ (DeepSpeed and
#      the few packages the image lacks: `bash scripts/gpu_wheels.sh` here first, then carry .whl). Elsewhere
#      .venv/bin/python if it has a CUDA torch. If .venv is missing it is created: with
#      --system-site-packages when the system python3 already has a CUDA torch (then requirements.txt is
#      installed without its torch pin, the CPU build), else plainly with all of requirements.txt. A .venv
#      whose torch cannot see a GPU (a copy of a CPU machine's) is left alone: a second environment on the
#      system's CUDA torch is made in runs/gpu_check_venv instead.
#   1. Builds the `small` base model offline (alpaca_rlhf.tools.make_tiny_model), builds DeepSpeed's
#      fused_adam op (the optimizer `--optimizer auto` picks on GPUs) and, in the background while the first
#      cases run, the transformer_inference op the hybrid engine needs. These are the `prep:` rows.
#   2. Runs short cases (a few optimizer steps each) through `sh run.sh --num_gpus 1`, each under `timeout`:
#        step 1 (SFT)        bf16 ZeRO-2 LoRA    | fp16 ZeRO-3 full, token-budget micro-batches
#        step 2 (reward)     bf16 ZeRO-2 LoRA    | fp16 ZeRO-3 full, token budget (from step 1 of the same dtype)
#        DPO                 bf16 ZeRO-2 LoRA    | fp16 ZeRO-3 full          (from step 1 of the same dtype)
#        step 3 (PPO)        bf16 ZeRO-2 LoRA    | fp16 ZeRO-3 full          (step-1 actor, step-2 critic)
#                            bf16 ZeRO-2 full + hybrid engine | fp16 ZeRO-2 LoRA + hybrid engine
#      Each dimension (dtype, ZeRO stage, LoRA or full, hybrid engine for step 3) is covered at least once
#      per step, not the full product. A case whose input case failed is `skipped`; so is one that no longer
#      fits the time budget. A case marked as allowed to refuse (hybrid engine with LoRA) that exits 2 with a
#      one-line `error: ...` on stderr is `refused`, not failed.
#   3. Per case: result (pass/fail/refused/skipped), wall seconds, peak GPU memory (max of `nvidia-smi
#      --query-gpu=memory.used` sampled every 200 ms during the case: the whole GPU, n/a without nvidia-smi).
#      `pass` needs exit code 0 and the exported model on disk.
#   The Markdown table (scripts/gpu_check_table.py) is printed and written to $OUT/gpu_check.md, the rows to
#   $OUT/gpu_check.tsv, each case's output to $OUT/gpu_check_logs/<case>.log. Exit status 1 if any case
#   failed (or no CUDA torch was found), else 0.
#
# Environment:
#   ARCH=llama|qwen2|mistral|opt|gpt2   base model architecture, passed as `--arch` to make_tiny_model only
#                                       when set (default: the tool's own, LLaMA)
#   OUT=DIR          where the report and logs go (default /tmp)
#   KEEP=1           keep the work directory (base model, every case's outputs); default: deleted at the end
#   CASES="a b"      run only these cases (names as in the table); a case's inputs must then exist in WORK_DIR
#   BUDGET_S=450     wall-clock budget for the whole script; cases that no longer fit are skipped
#   WORK_DIR=DIR     work directory to use (default: a new one under ${TMPDIR:-/tmp}); implies KEEP=1
#   PRESET=small     make_tiny_model preset (micro for a quick CPU dry run)
#   LORA_MODULES     --lora_module_name value (default q_proj,k_proj; c_attn for ARCH=gpt2)
#   OPTIMIZER=auto   --optimizer for every case (auto falls back to torch_adamw if fused_adam cannot be built)
#   ALLOW_CPU=1      run without a GPU (a CPU dry run of the command lines; fp16 and the hybrid engine fail there)
#   DRY_RUN=1        print each case's command line instead of running it
#   GPU_VENV=DIR     the second environment's place (default runs/gpu_check_venv; see 0. above)
#   PORT_BASE=29641  first --master_port (one more per case); MIN_CASE_S=25: skip a case with less time left
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
START_NS=$(date +%s%N)
BUDGET_S=${BUDGET_S:-450}
DEADLINE=$(( $(date +%s) + BUDGET_S ))
OUT_DIR=${OUT:-/tmp}
LOG_DIR=$OUT_DIR/gpu_check_logs
REPORT=$OUT_DIR/gpu_check.md
TSV=$OUT_DIR/gpu_check.tsv
PRESET=${PRESET:-small}
ARCH_NAME=${ARCH:-llama}
ARCH_FLAG=()
[ -n "${ARCH:-}" ] && ARCH_FLAG=(--arch "$ARCH")
if [ -z "${LORA_MODULES:-}" ]; then
  case "$ARCH_NAME" in gpt2) LORA_MODULES=c_attn ;; *) LORA_MODULES=q_proj,k_proj ;; esac
fi
OPTIMIZER=${OPTIMIZER:-auto}
ALLOW_CPU=${ALLOW_CPU:-0}
DRY_RUN=${DRY_RUN:-0}
CASES=$(echo "${CASES:-}" | tr ',' ' ')
KEEP=${KEEP:-0}
if [ -n "${WORK_DIR:-}" ]; then
  WORK=$WORK_DIR; KEEP=1; mkdir -p "$WORK" || exit 1
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
fi
mkdir -p "$LOG_DIR" || exit 1
rm -f "$LOG_DIR"/*.log "$TSV"
: > "$TSV"
NOTES_FILE=$WORK/notes.txt
: > "$NOTES_FILE"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# No silent fall-back to DeepSpeed's CPU accelerator: on the GPU machine every case must run on CUDA.
[ "$ALLOW_CPU" = 1 ] || export DS_ACCELERATOR=cuda

HAVE_SMI=0
command -v nvidia-smi >/dev/null 2>&1 && HAVE_SMI=1
LINEBUF=""   # the memory samples reach the file as they are taken, not when nvidia-smi's buffer fills
command -v stdbuf >/dev/null 2>&1 && LINEBUF="stdbuf -oL"
MON_PID=""
BG_PID=""

cleanup() {
  [ -n "$MON_PID" ] && kill "$MON_PID" 2>/dev/null
  [ -n "$BG_PID" ] && kill -- "-$BG_PID" 2>/dev/null
  if [ "$KEEP" = 1 ]; then
    echo "work directory kept: $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'echo "interrupted"; exit 130' INT TERM

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
clamp() {  # LIMIT_S -> LIMIT_S, or less so as to end 5 s before the deadline (at least 1)
  local left=$(( DEADLINE - $(date +%s) - 5 ))
  [ "$left" -lt "$1" ] && { [ "$left" -gt 0 ] && echo "$left" || echo 1; } || echo "$1"
}
secs() { printf '%d.%d' $(( $1 / 1000 )) $(( ($1 % 1000) / 100 )); }   # milliseconds -> "12.3"
one_line() { tr '\t\r\n' '   ' | cut -c1-300; }
note() { echo "$*" >> "$NOTES_FILE"; echo "note: $*"; }
add_row() {  # name result seconds peak note
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(printf '%s' "$5" | one_line)" >> "$TSV"
  echo "=== $1: $2 (${3}s, peak GPU MiB $4)${5:+ -- $5}"
}

# ------------------------------------------------------------------------------------------ Python environment
cuda_torch() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }

make_venv() {  # DIR with-system-torch(0/1): create DIR and install requirements.txt into it
  local dir=$1 system=$2 req=requirements.txt
  echo "creating $dir (system site packages: $system)"
  if [ "$system" = 1 ]; then
    python3 -m venv --clear --system-site-packages "$dir" || return 1
    # the system's CUDA torch stays; the pinned torch in requirements.txt is the CPU build
    req=$WORK/requirements-without-torch.txt
    grep -v -E '^[[:space:]]*torch[[:space:]]*([=<>!~;@[]|$)' requirements.txt > "$req"
  else
    python3 -m venv --clear "$dir" || return 1
  fi
  # bounded: without network (the lent machines have none) pip gives up instead of retrying for minutes
  timeout "$(clamp 420)" "$dir/bin/python" -m pip install --quiet --retries 1 --timeout 15 -r "$req"
}

SYSTEM_CUDA=0
command -v python3 >/dev/null 2>&1 && cuda_torch python3 && SYSTEM_CUDA=1
# The lent GPU machines have no network: their python3 holds CUDA torch and most of what we need, the rest travels
# as wheels in .whl/ (scripts/gpu_wheels.sh, run where PyPI is reachable), installed here into a site folder.
WHEEL_SITE=""
if [ "$ALLOW_CPU" != 1 ] && [ "$SYSTEM_CUDA" = 1 ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  WHEEL_SITE=${TMPDIR:-/tmp}/gpu_check_site
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WHEEL_SITE" \
      "$ROOT"/.whl/*.whl; then
    export PYTHONPATH="$WHEEL_SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$WHEEL_SITE/bin:$PATH"
  else
    echo "warning: installing the wheels in $ROOT/.whl failed"; WHEEL_SITE=""
  fi
fi
if [ -n "$WHEEL_SITE" ]; then
  PY=$(command -v python3)
  echo "python: the system's $PY with the wheels of .whl in $WHEEL_SITE"
else
  VENV=$ROOT/.venv
  if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    make_venv "$VENV" "$SYSTEM_CUDA" || echo "warning: installing requirements.txt into $VENV failed (offline?)"
  fi
  if [ "$ALLOW_CPU" != 1 ] && ! cuda_torch "$VENV/bin/python" && [ "$SYSTEM_CUDA" = 1 ]; then
    echo "$VENV has no CUDA torch; using an environment on the system's CUDA torch"
    VENV=${GPU_VENV:-$ROOT/runs/gpu_check_venv}
    if ! cuda_torch "$VENV/bin/python" || ! "$VENV/bin/python" -c 'import deepspeed, transformers' >/dev/null 2>&1; then
      make_venv "$VENV" 1 || echo "warning: installing requirements.txt into $VENV failed (offline?)"
    fi
  fi
  PY=$VENV/bin/python
  export VIRTUAL_ENV=$VENV PATH="$VENV/bin:$PATH"
fi
TABLE_PY=python3
command -v python3 >/dev/null 2>&1 || TABLE_PY=$PY

DEVICE="n/a"
[ "$HAVE_SMI" = 1 ] && DEVICE=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
VERSIONS=$("$PY" -c 'import torch, deepspeed, transformers; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")' 2>&1 | tail -1)
echo "python $PY: $VERSIONS"
echo "GPU: $DEVICE"

report() {
  local total_ms=$(( ($(date +%s%N) - START_NS) / 1000000 ))
  local notes=()
  while IFS= read -r line; do notes+=(--note "$line"); done < "$NOTES_FILE"
  "$TABLE_PY" "$ROOT/scripts/gpu_check_table.py" "$TSV" --output "$REPORT" --logs "$LOG_DIR" \
    --title "GPU check: ARCH $ARCH_NAME, preset $PRESET, 1 GPU" \
    --meta "device: $DEVICE" --meta "software: $VERSIONS" --meta "optimizer: $OPTIMIZER" \
    --meta "total: $(secs "$total_ms") s (budget $BUDGET_S s)" ${notes[@]+"${notes[@]}"} \
    || { echo "(table script failed; raw rows:)"; cat "$TSV"; }
  echo "report: $REPORT, logs: $LOG_DIR"
}

if [ "$ALLOW_CPU" != 1 ] && [ "$DRY_RUN" != 1 ] && ! cuda_torch "$PY"; then
  TORCH_INFO=$("$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, GPUs visible: {torch.cuda.device_count()}")' 2>&1 | tail -1)
  add_row "prep: CUDA torch" fail - - "$PY: $TORCH_INFO: no CUDA torch to use (ALLOW_CPU=1 runs a CPU dry run)"
  report
  exit 1
fi

# ------------------------------------------------------------------------------------------ preparation
FAILED=0
run_prep() {  # NAME TIMEOUT command...: a timed setup step with its own log; returns the command's status
  local name=$1 limit=$2; shift 2
  local log="$LOG_DIR/prep_${name}.log" t0 rc
  t0=$(now_ms)
  limit=$(clamp "$limit")
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  PREP_MS=$(( $(now_ms) - t0 ))
  PREP_TAIL=$(grep -v '^[[:space:]]*$' "$log" | tail -1 | one_line)
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && PREP_TAIL="timed out after ${limit}s"
  [ "$rc" = 0 ] || PREP_TAIL="$PREP_TAIL (log: $log)"
  return "$rc"
}

BASE=$WORK/base
if [ -f "$BASE/model.safetensors" ]; then
  echo "base model: $BASE (exists)"
elif [ "$DRY_RUN" = 1 ]; then
  echo "would build: $PY -m alpaca_rlhf.tools.make_tiny_model --output_dir $BASE --preset $PRESET ${ARCH_FLAG[*]+${ARCH_FLAG[*]}}"
elif run_prep base_model 180 "$PY" -m alpaca_rlhf.tools.make_tiny_model --output_dir "$BASE" --preset "$PRESET" \
       ${ARCH_FLAG[@]+"${ARCH_FLAG[@]}"}; then
  add_row "prep: base model ($ARCH_NAME $PRESET)" pass "$(secs "$PREP_MS")" - "$PREP_TAIL"
else
  add_row "prep: base model ($ARCH_NAME $PRESET)" fail "$(secs "$PREP_MS")" - "$PREP_TAIL"
  FAILED=$((FAILED + 1))
fi

ON_GPU=0
[ "$ALLOW_CPU" != 1 ] && cuda_torch "$PY" && ON_GPU=1
# load (JIT-compile if needed) one of DeepSpeed's CUDA ops: $PY -c "$LOAD_OP" BUILDER-NAME
LOAD_OP='import sys, time; from deepspeed.accelerator import get_accelerator
t = time.time(); builder = get_accelerator().create_op_builder(sys.argv[1])
if builder is None: sys.exit(f"no {sys.argv[1]} for the {get_accelerator().device_name()} accelerator")
builder.load(); print(f"{sys.argv[1]} loaded in {time.time() - t:.1f} s")'
if [ "$ON_GPU" = 1 ] && [ "$DRY_RUN" != 1 ] && [ "$OPTIMIZER" = auto ]; then
  # --optimizer auto is FusedAdam on GPUs: JIT-compiled on first use unless DeepSpeed was installed with it.
  if run_prep fused_adam_op 240 "$PY" -c "$LOAD_OP" FusedAdamBuilder; then
    add_row "prep: fused_adam op" pass "$(secs "$PREP_MS")" - ""
  else
    add_row "prep: fused_adam op" unavailable "$(secs "$PREP_MS")" - "$PREP_TAIL"
    OPTIMIZER=torch_adamw
    note "DeepSpeed's fused_adam op could not be built (nvcc / CUDA_HOME?): the cases ran with --optimizer torch_adamw; --optimizer auto (FusedAdam) would fail on this machine"
  fi
fi

wants() {  # is case NAME selected?
  [ -z "$CASES" ] && return 0
  case " $CASES " in *" $1 "*) return 0 ;; esac
  return 1
}
HYBRID_WANTED=0
for c in s3_bf16_z2_full_he s3_fp16_z2_lora_he; do wants "$c" && HYBRID_WANTED=1; done
BG_T0=0
INFERENCE_OP=unknown   # ready | unavailable (build failed) | late (still compiling when the budget ran short)
if [ "$ON_GPU" = 1 ] && [ "$DRY_RUN" != 1 ] && [ "$HYBRID_WANTED" = 1 ]; then
  # The hybrid engine's inference kernels take minutes to compile: build them while the other cases run
  # (8 of the 16 cores), so the hybrid cases find them ready.
  BG_T0=$(now_ms)
  MAX_JOBS=8 setsid -w "$PY" -c "$LOAD_OP" InferenceBuilder > "$LOG_DIR/prep_inference_op.log" 2>&1 &
  BG_PID=$!
fi
wait_inference_op() {
  [ -n "$BG_PID" ] || return 0
  local left=$(( DEADLINE - $(date +%s) - 60 )) rc
  while kill -0 "$BG_PID" 2>/dev/null && [ "$left" -gt 0 ]; do sleep 1; left=$((left - 1)); done
  if kill -0 "$BG_PID" 2>/dev/null; then
    kill -- "-$BG_PID" 2>/dev/null
    INFERENCE_OP=late
    add_row "prep: transformer_inference op" unavailable "$(secs $(( $(now_ms) - BG_T0 )))" - \
      "still compiling when the budget ran short (log: $LOG_DIR/prep_inference_op.log)"
  else
    wait "$BG_PID"; rc=$?
    if [ "$rc" = 0 ]; then
      INFERENCE_OP=ready   # (its own time: it may have finished long before this wait)
      add_row "prep: transformer_inference op" pass \
        "$(sed -n 's/.* loaded in \([0-9.]*\) s$/\1/p' "$LOG_DIR/prep_inference_op.log" | tail -1)" - ""
    else
      INFERENCE_OP=unavailable
      add_row "prep: transformer_inference op" unavailable "$(secs $(( $(now_ms) - BG_T0 )))" - \
        "$(grep -v '^[[:space:]]*$' "$LOG_DIR/prep_inference_op.log" | tail -1) (log: $LOG_DIR/prep_inference_op.log)"
    fi
  fi
  BG_PID=""
}

# ------------------------------------------------------------------------------------------ cases
STEP1=alpaca_rlhf/deepspeed_chat/training/step1_supervised_finetuning/main.py
STEP2=alpaca_rlhf/deepspeed_chat/training/step2_reward_model_finetuning/main.py
DPO=alpaca_rlhf/deepspeed_chat/training/step2_dpo_finetuning/main.py
STEP3=alpaca_rlhf/deepspeed_chat/training/step3_rlhf_finetuning/main.py
RM_STATIC=$ROOT/data/demo/Dahoas/rm-static
ALPACA=$ROOT/data/demo/MultiTurnAlpaca
PORT=${PORT_BASE:-29641}
MIN_CASE_S=${MIN_CASE_S:-25}

stop_monitor() {  # SIGTERM (a background job of this shell ignores SIGINT), SIGKILL if it lingers
  local i=0
  kill "$MON_PID" 2>/dev/null
  while kill -0 "$MON_PID" 2>/dev/null && [ "$i" -lt 20 ]; do sleep 0.1; i=$((i + 1)); done
  kill -KILL "$MON_PID" 2>/dev/null
  wait "$MON_PID" 2>/dev/null
  MON_PID=""
}

gpu_procs() {  # number of processes on the GPU now
  local n=0
  [ "$HAVE_SMI" = 1 ] && n=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | grep -c '[0-9]')
  echo "${n:-0}"
}

# run_case NAME LIMIT_S MAY_REFUSE(0/1) "NEEDED FILES" "PRODUCED FILES" SCRIPT ARGS...
run_case() {
  local name=$1 limit=$2 may_refuse=$3 needs=$4 produces=$5 script=$6
  shift 6
  wants "$name" || return 0
  local log="$LOG_DIR/$name.log" err="$WORK/$name.stderr" mem="$WORK/$name.mem" f missing="" left t0 ms rc
  local result note="" peak="n/a"
  if [ "$DRY_RUN" = 1 ]; then
    echo "--- $name (timeout ${limit}s)"
    echo "sh run.sh --num_gpus 1 --master_port $PORT $script $*"
    printf '%s\n' "$script" "$@" > "$WORK/$name.argv"
    add_row "$name" dry-run 0 - ""
    PORT=$((PORT + 1))
    return 0
  fi
  for f in $needs; do [ -e "$f" ] || missing="$missing ${f#"$WORK"/}"; done
  if [ -n "$missing" ]; then
    add_row "$name" skipped 0 - "missing input:$missing (its case failed or was not run)"
    return 0
  fi
  case " $* " in *" --enable_hybrid_engine "*)   # (a case allowed to refuse runs: the refusal comes first)
    if [ "$may_refuse" != 1 ] && { [ "$INFERENCE_OP" = late ] || [ "$INFERENCE_OP" = unavailable ]; }; then
      add_row "$name" skipped 0 - "the hybrid engine needs DeepSpeed's transformer_inference op: see its prep row"
      return 0
    fi ;;
  esac
  left=$(( DEADLINE - $(date +%s) - 5 ))
  if [ "$left" -lt "$MIN_CASE_S" ]; then
    add_row "$name" skipped 0 - "time budget spent (BUDGET_S=$BUDGET_S)"
    return 0
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo
  echo "=== $name: sh run.sh --num_gpus 1 --master_port $PORT $script $* (timeout ${limit}s)"
  : > "$log"; : > "$err"; : > "$mem"
  if [ "$HAVE_SMI" = 1 ]; then
    $LINEBUF nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$mem" 2>/dev/null &
    MON_PID=$!
  fi
  t0=$(now_ms)
  # stdout to the log; stderr to the log and to $err (for the `error:` line)
  { timeout --kill-after=15 "$limit" sh run.sh --num_gpus 1 --master_port "$PORT" "$script" "$@" 2>&1 1>&3 3>&- \
      | tee "$err"; rc=${PIPESTATUS[0]}; } 3>>"$log" >>"$log"
  ms=$(( $(now_ms) - t0 ))
  PORT=$((PORT + 1))
  if [ -n "$MON_PID" ]; then
    stop_monitor
    peak=$(awk '$1 ~ /^[0-9]+$/ && $1 > m { m = $1 } END { if (m != "") print m; else print "n/a" }' "$mem")
  fi
  if [ "$rc" = 0 ]; then
    result=pass
    for f in $produces; do [ -e "$f" ] || { result=fail; note="exit 0 but ${f#"$WORK"/} was not written"; }; done
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    result=fail; note="timed out after ${limit}s"
  elif [ "$rc" = 2 ] && grep -q '^error:' "$err"; then
    note=$(grep -m1 '^error:' "$err")
    if [ "$may_refuse" = 1 ]; then result=refused; else result=fail; fi
  else
    result=fail
    # the exception message if there is one, else an error-ish line, else the last line
    note=$(grep -E '(Error|Exception)[A-Za-z]*: ' "$log" | tail -1)
    [ -n "$note" ] || note=$(grep -i -E 'error|killed|return code' "$log" | tail -1)
    [ -n "$note" ] || note=$(grep -v '^[[:space:]]*$' "$log" | tail -1)
    note="exit $rc: ${note:-see the log}"
  fi
  [ "$result" = fail ] && FAILED=$((FAILED + 1))
  {
    echo
    echo "=== $name: $result, exit $rc, $(secs "$ms") s, peak GPU MiB $peak${note:+ -- $note}"
  } >> "$log"
  add_row "$name" "$result" "$(secs "$ms")" "$peak" "$note"
  # a killed run must not leave ranks holding the GPU for the next case
  local n=0
  while [ "$(gpu_procs)" -gt 0 ] && [ "$n" -lt 15 ]; do sleep 1; n=$((n + 1)); done
  [ "$n" -ge 15 ] && note "processes were still on the GPU 15 s after $name ended: later peaks include them"
  return 0
}

DATA=$WORK/data
common=(--data_path "$RM_STATIC" --data_output_path "$DATA" --disable_progress_bar --deepspeed --optimizer "$OPTIMIZER")
lora=(--lora_dim 8 --lora_module_name "$LORA_MODULES" --only_optimize_lora)
lora3=(--actor_lora_dim 8 --actor_lora_module_name "$LORA_MODULES" --critic_lora_dim 8
       --critic_lora_module_name "$LORA_MODULES" --only_optimize_lora)
s1() {  # name dtype zero extra...
  local name=$1 dtype=$2 zero=$3; shift 3
  run_case "$name" 150 0 "$BASE/model.safetensors" "$WORK/$name/model.safetensors" "$STEP1" "${common[@]}" \
    --sft_only_data_path "$ALPACA" --model_name_or_path "$BASE" --output_dir "$WORK/$name" --max_seq_len 128 \
    --per_device_train_batch_size 8 --per_device_eval_batch_size 16 --max_eval_samples 96 --num_train_epochs 1 \
    --learning_rate 1e-3 --max_train_steps 20 --dtype "$dtype" --zero_stage "$zero" "$@"
}
s2() {  # name actor dtype zero extra...
  local name=$1 actor=$2 dtype=$3 zero=$4; shift 4
  run_case "$name" 150 0 "$WORK/$actor/model.safetensors" "$WORK/$name/model.safetensors $WORK/$name/reward_stats.json" \
    "$STEP2" "${common[@]}" --model_name_or_path "$WORK/$actor" --output_dir "$WORK/$name" \
    --num_padding_at_beginning 0 --max_seq_len 128 --per_device_train_batch_size 8 --per_device_eval_batch_size 32 \
    --max_eval_samples 96 --num_train_epochs 1 --learning_rate 5e-3 --max_train_steps 10 \
    --dtype "$dtype" --zero_stage "$zero" "$@"
}
dpo() {  # name actor dtype zero extra...
  local name=$1 actor=$2 dtype=$3 zero=$4; shift 4
  run_case "$name" 150 0 "$WORK/$actor/model.safetensors" "$WORK/$name/model.safetensors" "$DPO" "${common[@]}" \
    --model_name_or_path "$WORK/$actor" --output_dir "$WORK/$name" --max_seq_len 128 \
    --per_device_train_batch_size 8 --per_device_eval_batch_size 16 --max_eval_samples 96 --num_train_epochs 1 \
    --learning_rate 5e-3 --beta 0.1 --max_train_steps 10 --dtype "$dtype" --zero_stage "$zero" "$@"
}
s3() {  # name limit may_refuse actor critic dtype actor_zero critic_zero extra...
  local name=$1 limit=$2 may_refuse=$3 actor=$4 critic=$5 dtype=$6 az=$7 cz=$8; shift 8
  run_case "$name" "$limit" "$may_refuse" "$WORK/$actor/model.safetensors $WORK/$critic/reward_stats.json" \
    "$WORK/$name/actor/model.safetensors $WORK/$name/critic/model.safetensors" "$STEP3" "${common[@]}" \
    --actor_model_name_or_path "$WORK/$actor" --critic_model_name_or_path "$WORK/$critic" --output_dir "$WORK/$name" \
    --num_padding_at_beginning 0 --per_device_generation_batch_size 8 --per_device_training_batch_size 4 \
    --ppo_epochs 2 --max_prompt_seq_len 64 --max_answer_seq_len 16 --actor_learning_rate 5e-3 \
    --critic_learning_rate 5e-3 --eval_batches 1 --seed 7 --no_auto_resume --enable_test_mode --test_stop_step 2 \
    --dtype "$dtype" --actor_zero_stage "$az" --critic_zero_stage "$cz" "$@"
}

s1 s1_bf16_z2_lora bf16 2 "${lora[@]}"
s1 s1_fp16_z3_full fp16 3 --max_tokens_per_batch 768
s2 s2_bf16_z2_lora s1_bf16_z2_lora bf16 2 "${lora[@]}"
s2 s2_fp16_z3_full s1_fp16_z3_full fp16 3 --max_tokens_per_batch 1024
dpo dpo_bf16_z2_lora s1_bf16_z2_lora bf16 2 "${lora[@]}"
dpo dpo_fp16_z3_full s1_fp16_z3_full fp16 3
s3 s3_bf16_z2_lora 180 0 s1_bf16_z2_lora s2_bf16_z2_lora bf16 2 2 "${lora3[@]}"
s3 s3_fp16_z3_full 180 0 s1_fp16_z3_full s2_fp16_z3_full fp16 3 3
wait_inference_op
s3 s3_bf16_z2_full_he 180 0 s1_bf16_z2_lora s2_bf16_z2_lora bf16 2 2 --enable_hybrid_engine
# DeepSpeed's hybrid engine does not see this project's LoRA layers: refusing the combination is allowed
s3 s3_fp16_z2_lora_he 180 1 s1_fp16_z3_full s2_fp16_z3_full fp16 2 2 "${lora3[@]}" --enable_hybrid_engine

echo
report
[ "$FAILED" -eq 0 ]

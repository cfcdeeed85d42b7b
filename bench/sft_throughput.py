#!/usr/bin/env python
"""Step 1 (SFT) training throughput: our DeepSpeed training loop vs a plain transformers.Trainer and TRL's
SFTTrainer (the pinned TRL in bench/.trl_site, see bench/requirements.txt) with its padding-free packing on and off.

    .venv/bin/python bench/sft_throughput.py --preset tiny --data demo --rounds 3 --steps 6 [--output_json FILE]
        [--sides ours,trainer,trl_packed,trl_padded] [--ours_args='--packing false']

--data demo: the demo's own step-1 rows (data/demo: Dahoas/rm-static's step-1 share and MultiTurnAlpaca, tokenized
by step 1's own code at --max_seq_len 256, shuffled once with --seed), with their real lengths and their prompt
tokens unlabelled; every side reads them in the same order, so every step sees the same rows everywhere and
tokens/s counts the rows' real tokens (padding is work, not tokens). --data random: BATCH sequences of SEQ_LEN
random non-special token ids, every token labelled (no padding, nothing to pack).

All sides train the same randomly initialised LlamaForCausalLM (alpaca_rlhf.tools.make_tiny_model),
fp32, on the CPU, in one process with --threads torch threads, with the same optimizer (torch AdamW, its
fused implementation, step 1's lr / betas / weight decay / eps), gradient clipping at 1.0 and a cosine
schedule without warmup; no evaluation, no saving, no logging beyond timing.

  ours     our step-1 building blocks in-process: step 1's parse_args, start_run (one-rank world),
           tokenizer_from_args, prepare_model(causal_lm_loader), make_dataloader + DataCollatorSFT,
           init_engine_for_loader (ZeRO stage 0, --optimizer torch_adamw) and train_loop with step 1's loss.
           A step is timed from the call of the loss function (forward) to the metrics-log call that follows
           engine.step() on the gradient-accumulation boundary.
  trainer  transformers.Trainer with TrainingArguments(optim="adamw_torch_fused", use_cpu=True, ...) and our
           collator (right-padded to the batch's longest row, labels -100 on padding); a step is timed from
           TrainerCallback.on_step_begin to on_step_end (forward, backward, clipping, optimizer, scheduler,
           zero_grad).
  trl_packed, trl_padded  TRL's SFTTrainer with the same TrainingArguments on the same rows (pre-tokenized, its
           prompt labels -100), padding_free True (one flattened sequence with position ids; on SDPA transformers
           builds the block-diagonal mask from them) or False (padded to the batch's longest row).

The first --warmup steps of every run are not counted. Each side runs in its own subprocess per round and
the order alternates between rounds (these machines drift by ~20% over minutes, so only ratios from
interleaved runs mean anything); step time is compared, process start-up is not. Per round: tokens/s =
measured tokens / summed measured step time; across rounds: median (min, max); s/step = tokens per step /
tokens/s. Peak memory is ru_maxrss of the worker process (the whole process: imports, model, optimizer
state, activations); "RSS@start" is the resident size when the first step starts (from_pretrained
memory-maps the weights, so pages not touched yet are not counted there). The last lines printed are
`ours/Trainer tokens/s ratio: X.XX` and, with TRL, `ours/SFTTrainer tokens/s ratio: X.XX` (against padding-free
packing on), each the median over rounds of the per-round ratio.
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TRL_SITE = os.path.join(REPO, "bench", ".trl_site")
if REPO not in sys.path:  # started as a script: make the repository importable
    sys.path.insert(0, REPO)

import alpaca_rlhf  # noqa: F401,E402  (before torch, in both sides' workers: MKL's kernel choice, cpu_blas.py)

# Step 1's defaults (step1_supervised_finetuning/main.py, utils/args.py, utils/ds_utils.py): both sides use them.
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.0
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which create_optimizer keeps
MAX_GRAD_NORM = 1.0  # get_train_ds_config(gradient_clipping=1.0)
LR_SCHEDULE = "cosine"


# ----------------------------------------------------------------------------------------------- workers

def _rss_mib() -> float:
    """Current resident set size of this process (MiB), from /proc; NaN where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _peak_rss_mib() -> float:
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux


class _Rows:
    """The benchmark's rows (a list of {"input_ids", "labels"} tensors, make_data), read in order."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _step_tokens(rows, batch_size: int):
    """Real (unpadded) tokens of each step's batch (a pair: both answers), the batches taken in order."""
    def tokens(row):
        return sum(len(row[k]) for k in ("input_ids", "chosen_ids", "rejected_ids") if k in row)
    return [sum(tokens(r) for r in rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def _sequential(trainer_class):
    """trainer_class reading its dataset in order (as every side does here)."""
    from torch.utils.data import SequentialSampler

    class InOrder(trainer_class):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)
    return InOrder


def _worker_result(side, w, step_times, warmup_times, model, optimizer, rss_start, losses):
    import torch
    tokens = _step_tokens(torch.load(w.data_file), w.batch_size)[w.warmup:w.warmup + len(step_times)]
    p = next(model.parameters())
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the Trainer's optimizer
    return {
        "side": side,
        "step_times_s": step_times,
        "warmup_times_s": warmup_times,
        "tokens_per_step": tokens,
        "tokens_per_s": sum(tokens) / sum(step_times) if step_times else float("nan"),
        "peak_rss_mib": _peak_rss_mib(),
        "rss_at_train_start_mib": rss_start,
        "threads": torch.get_num_threads(),
        "param_dtype": str(p.dtype),
        "device": str(p.device),
        "n_params": sum(q.numel() for q in model.parameters()),
        "optimizer": f"{type(inner).__module__}.{type(inner).__name__}"
                     + (f" (in {type(optimizer).__name__})" if inner is not optimizer else ""),
        "optimizer_defaults": {k: (list(v) if isinstance(v, tuple) else v) for k, v in inner.defaults.items()
                               if k in ("lr", "betas", "eps", "foreach", "fused", "amsgrad")},
        "optimizer_group_weight_decay": sorted({g["weight_decay"] for g in optimizer.param_groups if g["params"]}),
        "losses_first_last": [losses[0], losses[-1]] if losses else [],
    }


def _schedule_name(scheduler) -> str:
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the Trainer's scheduler
    fn = getattr(inner, "lr_lambdas", [None])[0]
    name = getattr(getattr(fn, "func", fn), "__name__", "")  # transformers' schedules are partials of a lambda
    return f"{type(inner).__name__}({name})" if name else type(inner).__name__


def run_ours(w) -> dict:
    import torch
    from alpaca_rlhf.deepspeed_chat.training.step1_supervised_finetuning import main as step1
    from alpaca_rlhf.deepspeed_chat.training.step2_reward_model_finetuning import main as step2
    from alpaca_rlhf.deepspeed_chat.training.utils.data.data_utils import (DataCollatorReward, DataCollatorSFT,
                                                                          make_dataloader)
    from alpaca_rlhf.deepspeed_chat.training.utils.entry import start_run
    from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import causal_lm_loader, tokenizer_from_args
    from alpaca_rlhf.deepspeed_chat.training.utils.model.reward_model import create_critic_model
    from alpaca_rlhf.deepspeed_chat.training.utils.model.token_log_probs import answer_nll
    from alpaca_rlhf.deepspeed_chat.training.utils.train_utils import init_engine_for_loader, prepare_model

    total = w.warmup + w.steps
    rm = w.task == "rm"
    args = (step2 if rm else step1).parse_args([
        "--model_name_or_path", w.model_dir, "--output_dir", w.scratch_dir,
        "--per_device_train_batch_size", str(w.batch_size), "--gradient_accumulation_steps", "1",
        "--max_seq_len", str(w.seq_len), "--num_train_epochs", "1", "--max_train_steps", str(total),
        "--learning_rate", str(LEARNING_RATE), "--weight_decay", str(WEIGHT_DECAY),
        "--adam_betas", str(ADAM_BETAS[0]), str(ADAM_BETAS[1]), "--lr_scheduler_type", LR_SCHEDULE,
        "--num_warmup_steps", "0", "--optimizer", "torch_adamw", "--zero_stage", "0", "--dtype", "fp32",
        "--seed", str(w.seed), "--disable_progress_bar", *shlex.split(w.ours_args or ""),
    ])
    start_run(args)  # one-rank gloo world; note: sets torch threads itself (OMP_NUM_THREADS or all cores)
    torch.set_num_threads(w.threads)
    tokenizer = tokenizer_from_args(args, args.model_name_or_path)
    if rm:  # as step 2 builds it: the reward head is trained
        spec, ds_config, model = prepare_model(args, lambda cfg: create_critic_model(
            args.model_name_or_path, tokenizer, cfg, 0, args.dropout, args.compute_fp32_loss, args.loss_type,
            dtype=args.dtype), force_optimize_params=["v_head"])
    else:
        spec, ds_config, model = prepare_model(args, causal_lm_loader(args, tokenizer))
    data = _Rows(torch.load(w.data_file))
    collator = (DataCollatorReward if rm else DataCollatorSFT)(tokenizer.pad_token_id)
    loader = make_dataloader(data, collator, args.per_device_train_batch_size, shuffle=False, seed=args.seed,
                             drop_last=True)
    engine = init_engine_for_loader(model, spec, args, ds_config, loader)

    marks = {"begin": None}
    times, losses = [], []
    rss = {"start": None}

    def sft_loss(batch):  # step 1's loss function, with the step's start time taken first
        if rss["start"] is None:
            rss["start"] = _rss_mib()
        marks["begin"] = time.perf_counter()
        if rm:  # step 2's loss
            return engine(batch["input_ids"], batch["attention_mask"], packing=args.packing)["loss"], {}
        nll, tokens = answer_nll(engine, batch, args.packing, args.logits_chunk)  # step 1's loss
        return nll / tokens.clamp(min=1), {}

    class TimingLogger:  # train_loop logs after engine.step() on every optimizer step: the step's end
        def log(self, step, metrics):
            if "loss/train" in metrics:
                times.append(time.perf_counter() - marks["begin"])
                losses.append(float(metrics["loss/train"]))

        def close(self):
            pass

    # train_loop logs through its own MetricsLogger after each optimizer step: the timer takes its place here
    from alpaca_rlhf.deepspeed_chat.training.utils import loop
    loop.MetricsLogger = lambda *unused, **unused_too: TimingLogger()
    loop.train_loop(engine, loader, sft_loss, lambda: {}, args, desc="bench ours", run_name="bench")
    if len(times) != total:
        raise RuntimeError(f"expected {total} timed steps from train_loop, got {len(times)}")
    result = _worker_result("ours", w, times[w.warmup:], times[:w.warmup], engine.module, engine.optimizer,
                            rss["start"], losses)
    result.update(max_grad_norm=engine.gradient_clipping(), lr_scheduler=_schedule_name(engine.lr_scheduler))
    return result


def run_trainer(w) -> dict:
    import torch
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer, TrainerCallback,
                              TrainingArguments, set_seed)
    from alpaca_rlhf.deepspeed_chat.training.utils.data.data_utils import DataCollatorSFT

    torch.set_num_threads(w.threads)
    set_seed(w.seed)
    if w.worker == "trl_reward":  # a fresh scalar head on the causal LM's decoder, as ours starts from
        model = AutoModelForSequenceClassification.from_pretrained(w.model_dir, num_labels=1)
        model.config.pad_token_id = model.config.pad_token_id or 0
    else:
        model = AutoModelForCausalLM.from_pretrained(w.model_dir)
    rows = torch.load(w.data_file)
    times, rss = [], {"start": None}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if rss["start"] is None:
                rss["start"] = _rss_mib()
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.begin)

    total = w.warmup + w.steps
    trl = w.worker.startswith("trl")
    if trl:  # TRL's SFTTrainer: its config is TrainingArguments plus its own fields
        sys.path.insert(0, TRL_SITE)
        from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
        from datasets import Dataset
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(w.model_dir)
        if tokenizer.pad_token is None:  # as our load_tokenizer: LLaMA pads with unk (id 0)
            tokenizer.pad_token = tokenizer.unk_token
    arguments_class = ({"trl_reward": RewardConfig, "trl_packed": SFTConfig, "trl_padded": SFTConfig}[w.worker]
                       if trl else TrainingArguments)
    extra = (dict(padding_free=w.worker == "trl_packed", packing=False, max_length=None,
                  dataset_kwargs={"skip_prepare_dataset": True}) if w.worker in ("trl_packed", "trl_padded")
             else dict(max_length=None) if w.worker == "trl_reward" else {})
    targs = arguments_class(
        output_dir=w.scratch_dir, per_device_train_batch_size=w.batch_size, gradient_accumulation_steps=1,
        max_steps=total, num_train_epochs=1, learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
        adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1], adam_epsilon=ADAM_EPS, optim="adamw_torch_fused",
        lr_scheduler_type=LR_SCHEDULE, warmup_steps=0, max_grad_norm=MAX_GRAD_NORM, use_cpu=True,
        report_to=[], save_strategy="no", logging_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_drop_last=True, seed=w.seed, **extra)
    timer = StepTimer()
    if w.worker == "trl_reward":
        data = Dataset.from_dict({"chosen_ids": [r["chosen_ids"].tolist() for r in rows],
                                  "rejected_ids": [r["rejected_ids"].tolist() for r in rows]})
        trainer = _sequential(RewardTrainer)(model=model, args=targs, train_dataset=data, processing_class=tokenizer,
                                             callbacks=[timer])
    elif trl:
        data = Dataset.from_dict({"input_ids": [r["input_ids"].tolist() for r in rows],
                                  "labels": [r["labels"].tolist() for r in rows]})
        trainer = _sequential(SFTTrainer)(model=model, args=targs, train_dataset=data, processing_class=tokenizer,
                                          callbacks=[timer])
    else:
        trainer = _sequential(Trainer)(model=model, args=targs, train_dataset=_Rows(rows),
                                       data_collator=DataCollatorSFT(model.config.pad_token_id or 0),
                                       callbacks=[timer])
    result = trainer.train()
    torch.set_num_threads(w.threads)
    if len(times) != total:
        raise RuntimeError(f"expected {total} timed steps from Trainer, got {len(times)}")
    losses = [float(result.training_loss)]  # mean over all steps (per-step losses are not logged)
    result = _worker_result(w.worker, w, times[w.warmup:], times[:w.warmup], trainer.model, trainer.optimizer,
                            rss["start"], losses)
    result.update(max_grad_norm=targs.max_grad_norm, lr_scheduler=_schedule_name(trainer.lr_scheduler))
    return result


def load_deepspeed_ops():
    """Load (JIT-building on first use) the op deepspeed.init_distributed loads on the CPU accelerator."""
    from deepspeed.accelerator import get_accelerator
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)


def worker_main(w):
    import torch
    torch.set_num_threads(w.threads)
    if w.worker == "ops":
        load_deepspeed_ops()
        return
    result = run_ours(w) if w.worker == "ours" else run_trainer(w)  # (trainer and the TRL sides)
    with open(w.result_file, "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------------------------- driver

def make_model(preset: str, model_dir: str):
    cmd = [sys.executable, "-m", "alpaca_rlhf.tools.make_tiny_model", "--output_dir", model_dir, "--preset", preset]
    subprocess.run(cmd, check=True, cwd=REPO, env=_child_env(threads=2), stdout=subprocess.DEVNULL)


def make_data(model_dir: str, n: int, seq_len: int, seed: int, data_file: str, kind: str = "random",
              task: str = "sft") -> str:
    """n rows for the benchmark, saved as a list of dicts of tensors; returns what they are.
    random: (n, seq_len) random token ids, none of them special (BOS/EOS/UNK/PAD), every one labelled.
    demo: the demo's step-1 rows as step 1 tokenizes them (max 256 tokens, prompts unlabelled), shuffled;
    with task rm, the demo's step-2 pairs as step 2 tokenizes them (chosen_ids, rejected_ids, prompt_len)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer
    g = torch.Generator().manual_seed(seed)
    if kind == "demo":
        from alpaca_rlhf.deepspeed_chat.training.utils.data.chat_template import load_chat_format
        from alpaca_rlhf.deepspeed_chat.training.utils.data.data_utils import build_phase_data
        from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import load_tokenizer
        demo = os.path.join(REPO, "data", "demo")
        tokenizer = load_tokenizer(model_dir)
        phase = 2 if task == "rm" else 1
        train, _ = build_phase_data([os.path.join(demo, "Dahoas", "rm-static")],
                                    [os.path.join(demo, "MultiTurnAlpaca")] if phase == 1 else [], "0,8,2", phase,
                                    seed, load_chat_format(None, tokenizer), 256, False)
        order = torch.randperm(len(train), generator=g)[:n].tolist()
        if len(order) < n:
            raise SystemExit(f"the demo has {len(train)} step-{phase} rows; fewer steps or a smaller batch")
        rows = [dict(train[i]) for i in order]
        torch.save(rows, data_file)
        if task == "rm":
            lengths = [len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows]
            return (f"{n} demo step-2 pairs, {sum(lengths) / n / 2:.1f} tokens per answer row on average "
                    f"(max {max(max(len(r['chosen_ids']), len(r['rejected_ids'])) for r in rows)})")
        lengths = [len(r["input_ids"]) for r in rows]
        labelled = sum(int((r["labels"] != -100).sum()) for r in rows)
        return (f"{n} demo step-1 rows, {sum(lengths) / n:.1f} tokens on average (max {max(lengths)}), "
                f"{labelled / sum(lengths):.0%} of them labelled")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = min(len(tokenizer), AutoConfig.from_pretrained(model_dir).vocab_size)
    special = set(tokenizer.all_special_ids) | {0}  # 0: LLaMA's unk, which our loader uses as pad
    allowed = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    ids = allowed[torch.randint(len(allowed), (n, seq_len), generator=g)]
    torch.save([{"input_ids": row, "labels": row.clone()} for row in ids], data_file)
    return f"{n} rows of {seq_len} random token ids ({len(allowed)} allowed ids), every one labelled"


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU"):
        env.pop(k, None)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu",  # the CPU benchmark, even on a GPU machine
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
    })
    return env


def run_worker(side: str, a, model_dir: str, data_file: str, work_dir: str, tag: str) -> dict:
    result_file = os.path.join(work_dir, f"{tag}-{side}.json")
    scratch = os.path.join(work_dir, f"{tag}-{side}-out")
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", side, "--_model_dir", model_dir,
           "--_data_file", data_file, "--_result_file", result_file, "--_scratch_dir", scratch,
           "--batch_size", str(a.batch_size), "--seq_len", str(a.seq_len), "--warmup", str(a.warmup),
           "--steps", str(a.steps), "--threads", str(a.threads), "--seed", str(a.seed),
           f"--ours_args={a.ours_args}", "--task", a.task, "--data", a.data]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_child_env(a.threads), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not os.path.exists(result_file):
        sys.stderr.write(proc.stdout[-6000:])
        raise SystemExit(f"{side} worker failed (exit {proc.returncode}); its output tail is above")
    with open(result_file) as f:
        result = json.load(f)
    result["wall_s"] = time.perf_counter() - t0
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def _stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


LABELS = {"ours": "ours", "trainer": "Trainer", "trl_packed": "SFTTrainer (padding-free)",
          "trl_padded": "SFTTrainer (padded)", "trl_reward": "RewardTrainer"}


def summarize(rounds, a) -> dict:
    summary = {}
    for side in a.side_list:
        rs = [r[side] for r in rounds]
        summary[side] = {
            "tokens_per_s": _stats([r["tokens_per_s"] for r in rs]),
            "s_per_step": _stats([statistics.mean(r["step_times_s"]) for r in rs]),
            "peak_rss_mib": _stats([r["peak_rss_mib"] for r in rs]),
            "rss_at_train_start_mib": _stats([r["rss_at_train_start_mib"] for r in rs]),
        }
    for other in a.side_list[1:]:  # ours against each, per round (interleaved), then the median
        ratios = [r["ours"]["tokens_per_s"] / r[other]["tokens_per_s"] for r in rounds]
        summary[f"ratio_vs_{other}"] = {
            "per_round": ratios, "median": statistics.median(ratios),
            "peak_rss_median": statistics.median(r["ours"]["peak_rss_mib"] / r[other]["peak_rss_mib"] for r in rounds)}
    return summary


def report(summary, rounds, a, meta):
    first = rounds[0]
    print(f"\n{'Reward-model' if a.task == 'rm' else 'SFT'} throughput, preset {a.preset} ({first['ours']['n_params'] / 1e6:.2f}M parameters), "
          f"batch {a.batch_size}: {meta['data']}; {first['ours']['param_dtype']}, {a.threads} threads, "
          f"{a.rounds} rounds x {a.steps} measured steps (+{a.warmup} warm-up)"
          + (f"; ours with {a.ours_args}" if a.ours_args else ""))
    for side in a.side_list:
        r = first[side]
        print(f"  {side:10s} optimizer {r['optimizer']} {r['optimizer_defaults']}, group weight decays "
              f"{r['optimizer_group_weight_decay']}, clip {r['max_grad_norm']}, {r['lr_scheduler']}, "
              f"threads at end {r['threads']}")
    print(f"  loss (sanity): ours step 1 {first['ours']['losses_first_last'][0]:.4f} -> last "
          f"{first['ours']['losses_first_last'][1]:.4f}; "
          + "; ".join(f"{LABELS[s]} mean {first[s]['losses_first_last'][0]:.4f}" for s in a.side_list[1:]))
    print("per round (order rotates):")
    for i, r in enumerate(rounds):
        print(f"  round {i + 1} ({' then '.join(r['order'])}): "
              + ", ".join(f"{s} {r[s]['tokens_per_s']:.0f} tok/s" for s in a.side_list))
    print(f"{'':27s}{'tokens/s median':>16s}{'min':>9s}{'max':>9s}{'s/step':>9s}{'peak RSS MiB':>14s}")
    for side in a.side_list:
        x = summary[side]
        print(f"{LABELS[side]:27s}{x['tokens_per_s']['median']:16.0f}{x['tokens_per_s']['min']:9.0f}"
              f"{x['tokens_per_s']['max']:9.0f}{x['s_per_step']['median']:9.3f}{x['peak_rss_mib']['median']:14.0f}")
    for other in a.side_list[1:]:
        ratio = summary[f"ratio_vs_{other}"]
        print(f"ours/{LABELS[other]}: per round " + ", ".join(f"{v:.2f}" for v in ratio["per_round"])
              + f"; peak RSS ratio {ratio['peak_rss_median']:.2f}")
    if "trainer" in a.side_list:
        print(f"ours/Trainer tokens/s ratio: {summary['ratio_vs_trainer']['median']:.2f}")
    if "trl_packed" in a.side_list:
        print(f"ours/SFTTrainer tokens/s ratio: {summary['ratio_vs_trl_packed']['median']:.2f}")
    if "trl_reward" in a.side_list:
        print(f"ours/RewardTrainer tokens/s ratio: {summary['ratio_vs_trl_reward']['median']:.2f}")


def parse_cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="make_tiny_model preset. Default tiny.")
    p.add_argument("--model_dir", default=None,
                   help="Use this existing model directory (from make_tiny_model) instead of building one.")
    p.add_argument("--rounds", type=int, default=5, help="Interleaved rounds (one run per side each). Default 5.")
    p.add_argument("--steps", type=int, default=6, help="Measured optimizer steps per run. Default 6.")
    p.add_argument("--warmup", type=int, default=2, help="Unmeasured steps at the start of each run. Default 2.")
    p.add_argument("--batch_size", type=int, default=16, help="Sequences per batch. Default 16.")
    p.add_argument("--seq_len", type=int, default=128, help="Tokens per sequence. Default 128.")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each worker. Default 2.")
    p.add_argument("--seed", type=int, default=1234, help="Seed for data, model and sampling. Default 1234.")
    p.add_argument("--output_json", default=None, help="Also write the summary and the raw rounds here.")
    p.add_argument("--task", choices=["sft", "rm"], default="sft",
                   help="sft: step 1 against Trainer and SFTTrainer; rm: step 2 (the pairwise reward model) against "
                        "TRL's RewardTrainer, on the demo's pairs (bench/rm_throughput.py). Default sft.")
    p.add_argument("--data", choices=["random", "demo"], default="random",
                   help="random: fixed-length random ids; demo: the demo's step-1 rows (real lengths, prompts "
                        "unlabelled). Default random.")
    p.add_argument("--sides", default=None,
                   help="Comma-separated, ours first: ours, trainer, trl_packed, trl_padded (task sft), trl_reward "
                        "(task rm); TRL's sides are skipped where bench/.trl_site is missing. Default: all of the "
                        "task's.")
    p.add_argument("--ours_args", default="", metavar="'FLAGS'",
                   help="More step-1 flags for ours, e.g. --ours_args='--packing false'. Default none.")
    for hidden in ("--_worker", "--_model_dir", "--_data_file", "--_result_file", "--_scratch_dir"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if min(a.rounds, a.steps, a.batch_size, a.seq_len, a.threads) < 1 or a.warmup < 0:
        p.error("--rounds, --steps, --batch_size, --seq_len and --threads must be >= 1, --warmup >= 0")
    others = ["trl_reward"] if a.task == "rm" else ["trainer", "trl_packed", "trl_padded"]
    a.sides = a.sides or ",".join(["ours"] + others)
    a.side_list = [x for x in a.sides.split(",") if x]
    if a.side_list[:1] != ["ours"] or not set(a.side_list[1:]) <= set(others) or len(a.side_list) < 2:
        p.error(f"--sides: ours first, then one or more of {', '.join(others)}; got {a.sides}")
    if a.task == "rm" and a.data != "demo":
        p.error("--task rm runs on the demo's pairs: --data demo")
    return a


def main(argv=None):
    a = parse_cli(argv)
    if a._worker:
        a.worker, a.model_dir, a.data_file = a._worker, a._model_dir, a._data_file
        a.result_file, a.scratch_dir = a._result_file, a._scratch_dir
        worker_main(a)
        return
    start = time.perf_counter()
    work_dir = tempfile.mkdtemp(prefix="sft-throughput-")
    try:
        model_dir = a.model_dir
        if model_dir is None:
            model_dir = os.path.join(work_dir, f"model-{a.preset}")
            print(f"building the {a.preset} model in {model_dir}", flush=True)
            make_model(a.preset, model_dir)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, os.path.abspath(__file__), "--_worker", "ops"], check=True, cwd=REPO,
                       env=_child_env(a.threads), stdout=subprocess.DEVNULL)
        # the op is JIT-built once (init_distributed keeps every process on one ninja, so it is not rebuilt)
        print(f"deepspeed CPU comm op ready in {time.perf_counter() - t0:.0f}s", flush=True)
        if not os.path.isdir(os.path.join(TRL_SITE, "trl")) and any(x.startswith("trl") for x in a.side_list):
            print(f"note: TRL is not installed in {TRL_SITE} (see bench/requirements.txt); its sides are skipped")
            a.side_list = [x for x in a.side_list if not x.startswith("trl")]
        data_file = os.path.join(work_dir, "data.pt")
        described = make_data(model_dir, (a.warmup + a.steps) * a.batch_size, a.seq_len, a.seed, data_file, a.data,
                              a.task)
        print(f"data: {described}", flush=True)
        rounds = []
        for i in range(a.rounds):
            shift = i % len(a.side_list)  # each side takes each place in the order in turn
            order = a.side_list[shift:] + a.side_list[:shift]
            r = {"order": list(order)}
            for side in order:
                r[side] = run_worker(side, a, model_dir, data_file, work_dir, f"r{i}")
            rounds.append(r)
            print(f"round {i + 1}/{a.rounds}: " + ", ".join(f"{x} {r[x]['tokens_per_s']:.0f} tok/s"
                                                            for x in a.side_list), flush=True)
        summary = summarize(rounds, a)
        meta = {"data": described, "total_wall_s": time.perf_counter() - start}
        if a.output_json:
            os.makedirs(os.path.dirname(os.path.abspath(a.output_json)), exist_ok=True)
            with open(a.output_json, "w") as f:
                json.dump({"config": {k: v for k, v in vars(a).items() if not k.startswith("_")},
                           "constants": {"learning_rate": LEARNING_RATE, "weight_decay": WEIGHT_DECAY,
                                         "adam_betas": ADAM_BETAS, "adam_eps": ADAM_EPS,
                                         "max_grad_norm": MAX_GRAD_NORM, "lr_scheduler_type": LR_SCHEDULE},
                           "meta": meta, "summary": summary, "rounds": rounds}, f, indent=1)
        print(f"total wall time {meta['total_wall_s']:.0f}s")
        report(summary, rounds, a, meta)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

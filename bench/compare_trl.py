#!/usr/bin/env python
"""Our PPO iteration against TRL's (trl.experimental.ppo in trl==1.12.0) in the same reference setting, or
(--algo grpo) our GRPO iteration against TRL's GRPOTrainer, interleaved in one invocation so that both see the
same machine drift.

    .venv/bin/python -m pip install --no-deps --target bench/.trl_site -r bench/requirements.txt   # once
    .venv/bin/python bench/compare_trl.py [--algo ppo|grpo] --preset tiny [--lora] [--iterations 8] [--warmup 1]
        [--rounds 1]

--algo grpo: the same 16 rows as 4 prompts x K=4 answers; ours with --advantage_estimator group_norm
--n_samples_per_prompt 4 --kl_coef 0 --kl_loss_coef 0.04 (no critic; the export is the frozen reward model), TRL's
GRPOTrainer with num_generations 4, beta 0.04 (so both run a reference pass), loss_type bnpo (a token mean, like
our default), one update per generation (num_iterations 1), exactly 64 answer tokens (min_new_tokens 64), the
same prompt ids (its prompt tokenizer is bypassed; the reward model reads the decoded text, as it does in TRL).

Same weights (our random-weight model and its exported sequence-classification copy with a random scalar head
for critic/value and reward model), tokenizer, prompts (16 x 64 random non-special ids per iteration), exactly 64
sampled tokens (ours: --ignore_eos; TRL: no stop token, so generation never ends early), temperature 1, top_k 0,
top_p 1, one PPO epoch, one mini-batch of 16, no gradient accumulation, fp32, 2 threads, torch AdamW (betas 0.9,
0.95) for both. TRL: gradient checkpointing off, bf16 off, no evaluation, no sample generations, no logging
callbacks, no saving, reward whitening off. --lora: LoRA rank 8 (alpha 1 = our scaling 1/8) on q_proj,k_proj for
the policy (TRL's peft_config; its reference = adapters off, like ours) and for the value model (adapters injected
here; base frozen, score head trained, like our critic with --only_optimize_lora). TRL keeps its own separate
frozen reward model (ours reuses the critic's base with LoRA off); that costs memory, not FLOPs.

Each round starts one worker process per framework (ours: bench/ppo_throughput.py, TRL: this file) and runs
them in lock-step: the driver releases one iteration at a time, alternately to each worker (ours first on even
iterations, TRL first on odd ones), the idle worker blocked on a pipe. Each measured iteration of ours is thus
paired with TRL's iteration right next to it in time, and the machine's drift (20% over minutes on shared
machines, much more under load) cancels in the pair's ratio. The last line is the median over all measured
pairs of TRL seconds / our seconds, i.e. the ours/TRL prompts-per-hour ratio.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
TRL_SITE = os.path.join(BENCH_DIR, ".trl_site")
sys.path.insert(0, BENCH_DIR)

import ppo_throughput as pt  # noqa: E402  (stdlib-only at import time)

GRPO_GROUP = 4  # --algo grpo: 4 prompts x K=4 answers = the 16 rows of the PPO setting


def group_of(args) -> int:
    return GRPO_GROUP if args.algo == "grpo" else 1


INSTALL_HINT = (f"TRL is not installed for the benchmark. Install it (into {TRL_SITE}, outside the project venv):\n"
                f"  .venv/bin/python -m pip install --no-deps --target bench/.trl_site -r bench/requirements.txt")


# ------------------------------------------------------------------------------------------------ TRL worker
class _IterationClock:
    """Per-iteration wall times of TRL's train loop, from outside: trainer callbacks mark iteration ends, a
    wrapper around TRL's batch_generation marks generation, a forward pre-hook on TRL's policy+value wrapper
    marks the start of training (its first call in an iteration)."""

    def __init__(self, meter, warmup):
        self.meter, self.warmup = meter, warmup
        self.records = []
        self._reset(time.perf_counter())

    def _reset(self, now):
        self.start, self.gen = now, []
        self.train_start = None
        self.meter.reset()

    def generation(self, t0, t1, columns):
        self.gen.append((t0, t1, columns))

    def training_forward(self):
        if self.train_start is None:
            self.train_start = time.perf_counter()

    def iteration_end(self):
        now = time.perf_counter()
        i = len(self.records)
        gen_s = sum(t1 - t0 for t0, t1, _ in self.gen)
        gen_end = self.gen[-1][1] if self.gen else self.start
        train_start = self.train_start or now
        columns = self.gen[-1][2] if self.gen else None
        self.records.append({"iteration": i, "warmup": i < self.warmup, "total_s": now - self.start,
                             "generate_s": gen_s, "score_s": train_start - gen_end, "train_s": now - train_start,
                             "other_s": (now - self.start) - gen_s - (train_start - gen_end) - (now - train_start),
                             "sequence_columns": columns, "passes": self.meter.by_label()})
        self._reset(time.perf_counter())


def _trl_worker_setup(actor_dir: str, threads: int):
    """A TRL worker's start: TRL importable, torch's threads, quiet transformers; returns the actor's tokenizer
    (padding as our load_tokenizer: LLaMA pads with unk, id 0)."""
    sys.path.insert(0, TRL_SITE)
    import torch
    torch.set_num_threads(threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    import trl
    if trl.__version__ != "1.12.0":
        print(f"warning: trl {trl.__version__} (the benchmark pins 1.12.0)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(actor_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token_id == 0 else tokenizer.eos_token
    return tokenizer


def _clock_callback(clock: "_IterationClock", gate, total: int):
    """A TrainerCallback that marks iteration ends on `clock` and, in lock-step, waits for the driver's go
    before each iteration (the wait is not part of the next iteration)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if gate is not None:
                gate.send({"ready": True})
                gate.wait("go")
            clock._reset(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            clock.iteration_end()
            if gate is not None:
                rec = clock.records[-1]
                gate.send({"iteration": rec["iteration"], "total_s": rec["total_s"]})
                gate.wait("go" if len(clock.records) < total else "end")
                clock._reset(time.perf_counter())
    return Clock()


def _train_and_report(trainer, meter, clock: "_IterationClock", output_dir: str, n_params: dict) -> dict:
    """Run TRL's train loop, check every iteration generated the full answers, and return the worker's run."""
    import shutil
    import trl
    trainer.train()
    meter.remove()
    peak = pt.peak_rss_mib()
    expected = pt.PROMPT_LEN + pt.ANSWER_LEN
    bad = [r["sequence_columns"] for r in clock.records if r["sequence_columns"] != expected]
    if bad:
        raise SystemExit(f"TRL generated sequences of {bad} columns, expected {expected}")
    shutil.rmtree(output_dir, ignore_errors=True)
    return {"records": clock.records, "n_params": n_params, "peak_rss_mib": peak,
            "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
            "trl_version": trl.__version__}


def run_trl(actor_dir, critic_dir, lora: bool, iterations: int, warmup: int, seed: int, threads: int, gate=None):
    tokenizer = _trl_worker_setup(actor_dir, threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PrinterCallback, ProgressCallback
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    tokenizer.padding_side = "left"
    total = warmup + iterations
    prompts = pt.make_prompts(tokenizer, total * pt.PROMPTS_PER_ITERATION, seed)
    train_dataset = Dataset.from_dict({"input_ids": prompts.tolist()})
    eval_dataset = Dataset.from_dict({"input_ids": prompts[:pt.PROMPTS_PER_ITERATION].tolist()})  # never used

    policy = AutoModelForCausalLM.from_pretrained(actor_dir)
    value_model = AutoModelForSequenceClassification.from_pretrained(critic_dir, num_labels=1)
    reward_model = AutoModelForSequenceClassification.from_pretrained(critic_dir, num_labels=1)
    peft_config = None
    if lora:
        from peft import LoraConfig, inject_adapter_in_model
        modules = pt.LORA_MODULES.split(",")
        peft_config = LoraConfig(r=pt.LORA_RANK, lora_alpha=1, lora_dropout=0.0, target_modules=modules,
                                 bias="none", task_type="CAUSAL_LM")
        value_model = inject_adapter_in_model(LoraConfig(r=pt.LORA_RANK, lora_alpha=1, lora_dropout=0.0,
                                                         target_modules=modules, bias="none"), value_model)
        for name, p in value_model.named_parameters():
            p.requires_grad_("lora_" in name or name.startswith("score."))

    output_dir = tempfile.mkdtemp(prefix="trl-ppo-bench-")
    config = PPOConfig(
        output_dir=output_dir, seed=seed, use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False,
        per_device_train_batch_size=pt.PROMPTS_PER_ITERATION, gradient_accumulation_steps=1, num_mini_batches=1,
        num_ppo_epochs=1, total_episodes=total * pt.PROMPTS_PER_ITERATION,
        local_rollout_forward_batch_size=pt.PROMPTS_PER_ITERATION, response_length=pt.ANSWER_LEN,
        stop_token=None, stop_token_id=None, missing_eos_penalty=None, temperature=1.0,
        kl_coef=0.05, kl_estimator="k1", whiten_rewards=False, cliprange=0.2, cliprange_value=0.2,
        gamma=1.0, lam=0.95, learning_rate=9.65e-6, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0,
        optim="adamw_torch", lr_scheduler_type="cosine", num_sample_generations=0, report_to="none",
        save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, push_to_hub=False)

    meter = pt.PassMeter()
    clock = _IterationClock(meter, warmup)

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=None,
                         reward_model=reward_model, train_dataset=train_dataset, value_model=value_model,
                         eval_dataset=eval_dataset, peft_config=peft_config, callbacks=[_clock_callback(clock, gate, total)])
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    checkpointing = [type(m).__name__ for model in (trainer.policy_model, value_model)
                     for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True]
    if checkpointing:
        raise SystemExit(f"activation checkpointing is on in TRL's models ({', '.join(sorted(set(checkpointing)))})")
    if trainer.policy_model.generation_config.eos_token_id is not None:
        raise SystemExit("TRL's policy still has an EOS token for generation: answers could end early")

    # generation timer (TRL's train loop looks batch_generation up in its module at call time)
    original_generation = trl_ppo.batch_generation

    def timed_generation(*args, **kwargs):
        t0 = time.perf_counter()
        out = original_generation(*args, **kwargs)
        clock.generation(t0, time.perf_counter(), out[0].shape[1])
        return out
    trl_ppo.batch_generation = timed_generation
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    wrapper.register_forward_pre_hook(lambda m, a: clock.training_forward())

    # FLOP counting with the same hooks as ours: bodies and heads of policy, reference, value and reward models
    base_policy = trainer.policy_model.get_base_model() if hasattr(trainer.policy_model, "get_base_model") \
        else trainer.policy_model
    policy_off = pt._lora_switch(base_policy)
    n_actor = meter.watch_body(base_policy.model, lambda: "reference" if policy_off() else "actor",
                               base_policy.get_input_embeddings(), base_policy.config)
    n_actor += meter.watch_head(base_policy.lm_head)
    if trainer.ref_model is not None:
        ref = trainer.ref_model
        meter.watch_body(ref.model, lambda: "reference", ref.get_input_embeddings(), ref.config)
        meter.watch_head(ref.lm_head)
    n_critic = meter.watch_body(value_model.model, lambda: "critic", value_model.get_input_embeddings(),
                                value_model.config)
    n_critic += meter.watch_head(value_model.score)
    meter.watch_body(trainer.reward_model.model, lambda: "reward", trainer.reward_model.get_input_embeddings(),
                     trainer.reward_model.config)
    meter.watch_head(trainer.reward_model.score)
    pt.timed_method(trainer.accelerator, "backward", meter, "actor+critic/backward")
    pt.timed_method(trainer.optimizer, "step", meter, "actor+critic/optimizer step")

    return _train_and_report(trainer, meter, clock, output_dir, {"actor": n_actor, "critic": n_critic})


def run_trl_grpo(actor_dir, critic_dir, lora: bool, iterations: int, warmup: int, seed: int, threads: int,
                 gate=None, group: int = 4):
    """TRL's GRPOTrainer in the reference setting adapted to groups: 16 / K prompts x K answers of exactly 64
    tokens (min_new_tokens = max_new_tokens: EOS is never sampled), the same prompt ids as ours (its prompt
    tokenizer is bypassed), the sequence-classification export as the reward model, beta 0.04 (so a reference
    pass, like ours), one update per generation, token-mean loss (bnpo), group-scaled advantages."""
    tokenizer = _trl_worker_setup(actor_dir, threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer
    total = warmup + iterations
    per_iteration = pt.PROMPTS_PER_ITERATION // group
    prompt_ids = pt.make_prompts(tokenizer, total * per_iteration, seed).tolist()
    # the prompts as text (what the reward model reads), each mapped back to its exact ids for generation
    ids_of = {tokenizer.decode(ids): ids for ids in prompt_ids}
    if len(ids_of) != len(prompt_ids):
        raise SystemExit("two random prompts decode to the same text; change --seed")
    train_dataset = Dataset.from_dict({"prompt": list(ids_of)})

    policy = AutoModelForCausalLM.from_pretrained(actor_dir)
    reward_model = AutoModelForSequenceClassification.from_pretrained(critic_dir, num_labels=1)
    peft_config = None
    if lora:
        from peft import LoraConfig
        peft_config = LoraConfig(r=pt.LORA_RANK, lora_alpha=1, lora_dropout=0.0,
                                 target_modules=pt.LORA_MODULES.split(","), bias="none", task_type="CAUSAL_LM")
    output_dir = tempfile.mkdtemp(prefix="trl-grpo-bench-")
    config = GRPOConfig(
        output_dir=output_dir, seed=seed, use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False,
        per_device_train_batch_size=pt.PROMPTS_PER_ITERATION, gradient_accumulation_steps=1, num_generations=group,
        max_steps=total, num_train_epochs=1, max_completion_length=pt.ANSWER_LEN,
        generation_kwargs={"min_new_tokens": pt.ANSWER_LEN}, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.04, num_iterations=1, epsilon=0.2, scale_rewards="group", loss_type="bnpo",
        learning_rate=9.65e-6, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, optim="adamw_torch",
        lr_scheduler_type="cosine", report_to="none", save_strategy="no", eval_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, push_to_hub=False,
        log_completions=False)

    meter = pt.PassMeter()
    clock = _IterationClock(meter, warmup)

    trainer = GRPOTrainer(model=policy, reward_funcs=reward_model, args=config, train_dataset=train_dataset,
                          processing_class=tokenizer, reward_processing_classes=tokenizer,
                          peft_config=peft_config, callbacks=[_clock_callback(clock, gate, total)])
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)

    # the exact prompt ids (TRL would tokenize the text again, with a BOS, to another length)
    trainer._tokenize_prompts = lambda prompts: ([list(ids_of[p]) for p in prompts], None, {})
    generate = trainer._generate_single_turn

    def timed_generation(*args, **kwargs):
        t0 = time.perf_counter()
        out = generate(*args, **kwargs)
        clock.generation(t0, time.perf_counter(), pt.PROMPT_LEN + max(len(c) for c in out[0]))
        return out
    trainer._generate_single_turn = timed_generation
    score = trainer._generate_and_score_completions

    def scored_then_train(*args, **kwargs):  # generation, rewards and reference log-probs end here
        out = score(*args, **kwargs)
        clock.training_forward()
        return out
    trainer._generate_and_score_completions = scored_then_train

    base_policy = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    policy_off = pt._lora_switch(base_policy)
    n_actor = meter.watch_body(base_policy.model, lambda: "reference" if policy_off() else "actor",
                               base_policy.get_input_embeddings(), base_policy.config)
    n_actor += meter.watch_head(base_policy.lm_head)
    if getattr(trainer, "ref_model", None) is not None:
        ref = trainer.ref_model
        meter.watch_body(ref.model, lambda: "reference", ref.get_input_embeddings(), ref.config)
        meter.watch_head(ref.lm_head)
    meter.watch_body(reward_model.model, lambda: "reward", reward_model.get_input_embeddings(), reward_model.config)
    meter.watch_head(reward_model.score)
    pt.timed_method(trainer.accelerator, "backward", meter, "actor/backward")  # (its optimizer comes with train())

    return _train_and_report(trainer, meter, clock, output_dir, {"actor": n_actor, "critic": 0})


def worker_main(args):
    pt.set_threads(args.threads)
    pt.blas_setup(stock=args.trl_stock_blas)  # before TRL (and so torch) loads
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gate = pt.Gate(args._cmd_fd, args._res_fd) if args._cmd_fd is not None else None
    if args.algo == "grpo":
        run = run_trl_grpo(args.model, args.critic_model, args.lora, args.iterations, args.warmup, args.seed,
                           args.threads, gate, GRPO_GROUP)
    else:
        run = run_trl(args.model, args.critic_model, args.lora, args.iterations, args.warmup, args.seed,
                      args.threads, gate)
    setting = {"preset": args.preset, "lora": args.lora, "threads": args.threads, "warmup": args.warmup,
               "iterations": args.iterations, "seed": args.seed, "group": group_of(args)}
    report = pt.build_report("TRL", setting, run)
    report["trl_version"] = run["trl_version"]
    report["blas"] = pt.blas_status()
    with open(args._output, "w") as f:
        json.dump(report, f, indent=1)


# ------------------------------------------------------------------------------------------------ driver
class Worker:
    """One framework's worker process in lock-step (see pt.Gate): its log goes to a file, commands and replies
    through two pipes."""

    def __init__(self, name, cmd, log_path):
        self.name, self.log_path = name, log_path
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd + ["--_cmd_fd", str(cmd_r), "--_res_fd", str(res_w)], cwd=REPO_DIR,
                                     stdout=self.log, stderr=subprocess.STDOUT, pass_fds=(cmd_r, res_w))
        os.close(cmd_r)
        os.close(res_w)
        self.cmd = os.fdopen(cmd_w, "w")
        self.res = os.fdopen(res_r, "r")

    def receive(self):
        line = self.res.readline()
        if not line:
            self.fail("exited early")
        return json.loads(line)

    def send(self, command):
        try:
            self.cmd.write(command + "\n")
            self.cmd.flush()
        except BrokenPipeError:
            self.fail("exited early")

    def finish(self):
        self.send("end")
        code = self.proc.wait()
        self.log.close()
        if code != 0:
            self.fail(f"exit {code}")

    def fail(self, why):
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.flush()
        sys.stderr.write(open(self.log_path).read()[-4000:])
        raise SystemExit(f"{self.name} worker failed ({why}); log: {self.log_path}")


def lockstep(cmds: dict, total: int, warmup: int, describe) -> dict:
    """Start one worker per {name: (command, log path)}, one after the other (start-up is not measured), then
    release `total` iterations one at a time, alternately to each (the first named goes first on even
    iterations, the other on odd ones; the idle one waits on its pipe), and end them. After each iteration
    prints describe(i, times, warm-up?). Returns {name: [seconds per iteration]}."""
    workers = {}
    try:
        for name, (cmd, log_path) in cmds.items():
            workers[name] = Worker(name, cmd, log_path)
            workers[name].receive()  # ready
        names = list(workers)
        times = {name: [] for name in names}
        for i in range(total):
            for name in (names if i % 2 == 0 else names[::-1]):
                time.sleep(0.2)  # let the other worker's threads go idle
                workers[name].send("go")
                times[name].append(workers[name].receive()["total_s"])
            print(describe(i, times, i < warmup), flush=True)
        for w in workers.values():
            w.finish()
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()
    return times


def run_round(r, args, common, work):
    """One lock-step round; returns ({framework: report}, [(ours s, TRL s) per measured iteration])."""
    outs = {name: os.path.join(work, f"round{r}-{name}.json") for name in ("ours", "TRL")}
    cmds = {"ours": [sys.executable, os.path.join(BENCH_DIR, "ppo_throughput.py"), *common, "--quiet",
                     "--no_matmul", "--output_json", outs["ours"], "--group", str(group_of(args))]
            + ([f"--trainer_args={args.ours_args}"] if args.ours_args else []),
            "TRL": [sys.executable, os.path.abspath(__file__), "--_worker", "trl", *common, "--_output", outs["TRL"],
                    "--algo", args.algo]
            + (["--trl_stock_blas"] if args.trl_stock_blas else [])}

    def describe(i, times, warm):
        tag = " (warm-up)" if warm else f"  ratio {times['TRL'][-1] / times['ours'][-1]:.2f}"
        return f"  round {r} iteration {i}: ours {times['ours'][-1]:.2f} s, TRL {times['TRL'][-1]:.2f} s{tag}"
    times = lockstep({name: (cmd, os.path.join(work, f"round{r}-{name}.log")) for name, cmd in cmds.items()},
                     args.warmup + args.iterations, args.warmup, describe)
    reports = {name: json.load(open(outs[name])) for name in outs}
    pairs = list(zip(times["ours"], times["TRL"]))[args.warmup:]
    return reports, pairs


def driver_main(args):
    if not os.path.isdir(os.path.join(TRL_SITE, "trl")):
        sys.stderr.write(INSTALL_HINT + "\n")
        return 2
    actor_dir, critic_dir = pt.prepare_models(args.preset, args.model, args.critic_model)
    work = tempfile.mkdtemp(prefix="compare-trl-")
    common = ["--preset", args.preset, "--model", actor_dir, "--critic_model", critic_dir,
              "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--seed", str(args.seed),
              "--threads", str(args.threads)] + (["--lora"] if args.lora else [])
    print(f"compare ({args.algo}): preset {args.preset}{' + LoRA' if args.lora else ''}, {args.rounds} round(s) of "
          f"{args.warmup} warm-up + {args.iterations} measured iterations per framework, lock-step; logs in {work}",
          flush=True)
    results, pairs = {"ours": [], "TRL": []}, []
    for r in range(args.rounds):
        reports, round_pairs = run_round(r, args, common, work)
        for name in results:
            results[name].append(reports[name])
        pairs += round_pairs

    ratios = [trl_s / ours_s for ours_s, trl_s in pairs]
    ratio = statistics.median(ratios)

    def med(name, key):
        return statistics.median(x[key] for rep in results[name] for x in rep["records"] if not x["warmup"])

    summary = {}
    for name in ("ours", "TRL"):
        totals = [x["total_s"] for rep in results[name] for x in rep["records"] if not x["warmup"]]
        s = statistics.median(totals)
        last = results[name][-1]
        summary[name] = {
            "s_per_iteration": s, "min": min(totals), "max": max(totals),
            "prompts_per_hour": pt.PROMPTS_PER_ITERATION // group_of(args) * 3600.0 / s,
            "generate_s": med(name, "generate_s"), "score_s": med(name, "score_s"), "train_s": med(name, "train_s"),
            "peak_rss_mib": max(rep["peak_rss_mib"] for rep in results[name]),
            "gflop_per_iteration": last.get("flops", {}).get("counted_per_iteration", float("nan")) / 1e9,
            "optimizer": last.get("optimizer", "?"),
        }
    rows = [
        ("s / iteration (median)", lambda x: f"{x['s_per_iteration']:.3f}"),
        ("s / iteration (min - max)", lambda x: f"{x['min']:.2f} - {x['max']:.2f}"),
        ("prompts / hour", lambda x: f"{x['prompts_per_hour']:.0f}"),
        ("generation s (tokens/s)",
         lambda x: f"{x['generate_s']:.3f} ({pt.PROMPTS_PER_ITERATION * pt.ANSWER_LEN / x['generate_s']:.0f})"),
        ("scoring s", lambda x: f"{x['score_s']:.3f}"),
        ("training s", lambda x: f"{x['train_s']:.3f}"),
        ("GFLOP / iteration (counted)", lambda x: f"{x['gflop_per_iteration']:.1f}"),
        ("peak resident memory MiB", lambda x: f"{x['peak_rss_mib']:.0f}"),
        ("optimizer", lambda x: x["optimizer"]),
    ]
    print()
    k = group_of(args)
    shape = (f"{pt.PROMPTS_PER_ITERATION} prompts" if k == 1 else
             f"GRPO: {pt.PROMPTS_PER_ITERATION // k} prompts x {k} answers")
    print(f"== ours vs TRL {results['TRL'][-1].get('trl_version', '')} {'GRPOTrainer' if k > 1 else 'PPOTrainer'}: "
          f"preset {args.preset}{' + LoRA' if args.lora else ''}, {shape} x ({pt.PROMPT_LEN} + "
          f"{pt.ANSWER_LEN} tokens), fp32, {args.threads} threads, {len(pairs)} lock-step iteration pairs "
          f"({args.rounds} round(s)) ==")
    if args.ours_args:
        print(f"  ours with: {args.ours_args}")
    for name in ("ours", "TRL"):
        print(f"  BLAS, {name}: {results[name][-1].get('blas', '?')}")
    width = max(len(k) for k, _ in rows)
    print(f"  {'':<{width}}  {'ours':>14}  {'TRL':>14}")
    for label, fmt in rows:
        print(f"  {label:<{width}}  {fmt(summary['ours']):>14}  {fmt(summary['TRL']):>14}")
    print(f"  per-pair TRL s / ours s: {', '.join(f'{x:.2f}' for x in ratios)}")
    print(f"  (min {min(ratios):.2f}, max {max(ratios):.2f}; ratio of the pooled medians "
          f"{summary['TRL']['s_per_iteration'] / summary['ours']['s_per_iteration']:.2f})")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"summary": summary, "pair_ratios": ratios, "ratio": ratio, "rounds": results}, f, indent=1)
    print(f"ours/TRL prompts/hour ratio: {ratio:.2f}", flush=True)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algo", choices=["ppo", "grpo"], default="ppo",
                   help="ppo: our PPO against TRL's PPOTrainer; grpo: our critic-free GRPO (group_norm, K=4, KL loss "
                        "0.04) against TRL's GRPOTrainer on 4 prompts x 4 answers. Default ppo.")
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    p.add_argument("--lora", action="store_true", help="LoRA rank 8 on q_proj,k_proj for actor/policy and critic/value.")
    p.add_argument("--iterations", type=int, default=8,
                   help="Measured iterations per framework and round. Default 8.")
    p.add_argument("--warmup", type=int, default=1, help="Uncounted iterations at the start of each round. Default 1.")
    p.add_argument("--rounds", type=int, default=1,
                   help="Rounds, each with a fresh pair of worker processes. Default 1.")
    p.add_argument("--model", default=None, help="Actor directory (default: bench/.models/PRESET, built on first use).")
    p.add_argument("--critic_model", default=None, help="Critic/reward export (default: made from --model).")
    p.add_argument("--seed", type=int, default=pt.SEED)
    p.add_argument("--threads", type=int, default=pt.THREADS)
    p.add_argument("--output_json", default=None, help="Write every block's results and the summary here.")
    p.add_argument("--trl_stock_blas", action="store_true",
                   help="Run TRL on torch's MKL as it comes. By default its process gets the same correction of "
                        "MKL's kernel choice on AMD processors as ours (alpaca_rlhf/cpu_blas.py), so the ratio "
                        "compares the trainers, not the BLAS; with this flag it shows what a TRL user gets out of "
                        "the box. No difference on Intel processors.")
    p.add_argument("--ours_args", default="", metavar="'FLAGS'",
                   help="More step-3 flags for our trainer (ppo_throughput.py --trainer_args), e.g. "
                        "--ours_args=--compile_elementwise. Default none: the reference setting as it is.")
    p.add_argument("--_worker", choices=["trl"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--_output", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_cmd_fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_res_fd", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--iterations and --rounds must be >= 1, --warmup >= 0")
    if args._worker:
        return worker_main(args)
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Throughput of our PPO iteration (step 3: DeepSpeedRLHFEngine + PPOTrainer) in the benchmark's reference
setting, run in-process as a one-rank world on the CPU.

    .venv/bin/python bench/ppo_throughput.py --preset tiny [--lora] [--iterations 5] [--warmup 1]
                                             [--model DIR] [--critic_model DIR] [--output_json FILE]

Reference setting: randomly initialised LLaMA models from `alpaca_rlhf.tools.make_tiny_model` (preset tiny or
small), critic and reward model = the same decoder with a random scalar head (exported once as a
LlamaForSequenceClassification checkpoint, which our critic loader and TRL both read); 16 prompts of exactly
64 random non-special token ids per iteration (fixed seed), exactly 64 sampled answer tokens (--ignore_eos,
temperature 1, top_k 0, top_p 1), one PPO epoch over one mini-batch of 16, no gradient accumulation, fp32,
ZeRO stage 0, torch AdamW, 2 threads, no logging, no saving. --lora: actor and critic train only LoRA rank 8
on q_proj,k_proj (--only_optimize_lora; the reference and reward are the frozen bases). --group K: GRPO, the 16
answers as 16 / K prompts x K answers (group_norm advantages, no critic, the KL to the reference as a loss term).

Per iteration it reports generation tokens/s, scoring and training time (split per forward pass with forward
hooks placed from outside the trainer), total seconds (median, min, max after warm-up), prompts/hour, peak
resident memory, FLOPs of one iteration (counted from the forward calls the trainer actually makes, next to
the textbook formula) and the achieved FLOP/s against a large fp32 matmul measured by this script.
"""
import argparse
import hashlib
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
MODELS_DIR = os.path.join(BENCH_DIR, ".models")

# the reference setting
PROMPTS_PER_ITERATION = 16
PROMPT_LEN = 64
ANSWER_LEN = 64
THREADS = 2
SEED = 1234
LORA_RANK = 8
LORA_MODULES = "q_proj,k_proj"


def set_threads(threads: int):
    """Before torch is imported: the OpenMP pool size (our init_distributed also reads OMP_NUM_THREADS)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


# ------------------------------------------------------------------------------------------------ models
def _run_quiet(cmd, what: str):
    proc = subprocess.run(cmd, cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:])
        raise SystemExit(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}")


def build_actor(preset: str) -> str:
    """bench/.models/PRESET: our tool's random-weight LlamaForCausalLM + tokenizer (built once, then reused)."""
    out = os.path.join(MODELS_DIR, preset)
    if not os.path.exists(os.path.join(out, "config.json")):
        os.makedirs(MODELS_DIR, exist_ok=True)
        print(f"building the {preset} model in {out} ...", flush=True)
        _run_quiet([sys.executable, "-m", "alpaca_rlhf.tools.make_tiny_model", "--output_dir", out,
                    "--preset", preset, "--seed", str(SEED)], "make_tiny_model")
    return out


def export_reward_model(actor_dir: str, out_dir: str, seed: int = SEED):
    """The actor's decoder with a random scalar head (normal, std = initializer_range, seeded), saved as a
    LlamaForSequenceClassification checkpoint (`model.*` + `score.weight`): our create_critic_model restores
    the head from it, TRL loads it with AutoModelForSequenceClassification. Written atomically."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialised" is the point here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(actor_dir, num_labels=1)
    finally:
        hf_logging.set_verbosity(verbosity)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        std = getattr(model.config, "initializer_range", 0.02)
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=generator) * std)
    model.config.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-rm-", dir=parent)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(actor_dir).save_pretrained(tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)


def reward_dir_for(actor_dir: str) -> str:
    key = hashlib.sha1(os.path.abspath(actor_dir).encode()).hexdigest()[:8]
    return os.path.join(MODELS_DIR, f"{os.path.basename(os.path.normpath(actor_dir))}-rm-{key}")


def prepare_models(preset: str, model_dir=None, critic_dir=None):
    """(actor dir, critic/reward dir): built or exported on first use under bench/.models."""
    actor = model_dir or build_actor(preset)
    if not os.path.isdir(actor):
        raise SystemExit(f"--model {actor} is not a directory")
    critic = critic_dir or reward_dir_for(actor)
    if not os.path.exists(os.path.join(critic, "config.json")):
        print(f"exporting the reward/critic model (random scalar head) to {critic} ...", flush=True)
        # in a child process: loading a model here would count in this process's peak memory
        _run_quiet([sys.executable, os.path.abspath(__file__), "--_export_reward", actor, critic], "reward export")
    return actor, critic


def make_prompts(tokenizer, count: int, seed: int = SEED):
    """(count, 64) token ids drawn uniformly from the tokenizer's vocabulary without its special tokens
    (so no prompt token is the pad/unk, BOS or EOS id). Deterministic for a tokenizer and seed."""
    import torch
    special = set(tokenizer.all_special_ids) | {tokenizer.pad_token_id, tokenizer.eos_token_id,
                                                 tokenizer.bos_token_id, tokenizer.unk_token_id}
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (count, PROMPT_LEN), generator=generator)]


# ------------------------------------------------------------------------------------------------ measuring
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def blas_setup(stock: bool = False) -> None:
    """Before torch loads: `import alpaca_rlhf` corrects MKL's kernel choice on AMD processors (its cpu_blas.py),
    as every entry point of ours does; `stock` leaves torch's MKL as it comes. blas_status() says which it was."""
    os.environ["ALPACA_RLHF_MKL_VENDOR_FIX"] = "0" if stock else "1"  # the flag decides, not the environment
    if REPO_DIR not in sys.path:
        sys.path.insert(0, REPO_DIR)
    import alpaca_rlhf  # noqa: F401  (applies it, once per process)


def blas_status() -> str:
    """One line: what the correction did in this process (cpu_blas.describe())."""
    from alpaca_rlhf import cpu_blas
    return cpu_blas.describe()


def settle_heap_for_profiling(megabytes: int = 1024) -> str:
    """Make glibc's heap hold `megabytes` of already-touched memory, kept when freed, before a profiled iteration.

    torch.profiler's own records fragment the heap, so without this the large tensors of the profiled iteration
    land on fresh pages, and each first touch is a page fault charged to the operator writing the tensor: on
    `tiny` the profile showed aten::silu_backward at 9.3 ms a call against 1.0 ms unprofiled. With this the
    operators' outputs reuse touched pages (silu_backward 0.8 ms a call in the profile); the ~20 thousand faults
    still counted on that iteration's line are the profiler's own records. The settings would not change the
    measured iterations either (five variants, three interleaved runs each, within the machine's drift), but
    they are applied only after the last of them. glibc only; returns what it did."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        # blocks up to 32 MiB (glibc's maximum) from the heap, and freed memory never given back to the kernel
        if not (libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)):
            return "heap not settled (mallopt refused)"
    except (OSError, AttributeError):
        return "heap not settled (not glibc)"
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = 16 << 20
    blocks = [b for b in (libc.malloc(block) for _ in range(max(1, megabytes // 16))) if b]
    for b in blocks:
        ctypes.memset(b, 0, block)  # the first touch, paid here instead of inside the profile
    for b in blocks:
        libc.free(b)
    return f"heap settled: {len(blocks) * 16} MiB touched and kept"


def product_gflops(m: int, k: int, n: int, repeats: int = 8):
    """fp32 (m x k) @ (k x n) with the current thread count, timed `repeats` times after one untimed run:
    (best, median) GFLOP/s."""
    import torch
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
    c = torch.empty(m, n)
    torch.mm(a, b, out=c)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        times.append(time.perf_counter() - t0)
    flops = 2.0 * m * k * n
    return flops / min(times) / 1e9, flops / statistics.median(times) / 1e9


def matmul_gflops(n: int = 2048, repeats: int = 8):
    """The machine's matmul rate: an n x n fp32 product, (best, median) GFLOP/s."""
    return product_gflops(n, n, n, repeats)


def _is_lora_name(name: str) -> bool:
    return "lora_" in name  # ours: lora_A / lora_B; peft: lora_A.default.weight ...


def _param_counts(module, exclude=()):
    """(parameters, trainable parameters) of `module` without LoRA matrices and without the given tensors."""
    skip = {id(t) for t in exclude}
    total = trainable = 0
    for name, p in module.named_parameters():
        if id(p) in skip or _is_lora_name(name):
            continue
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


class PassMeter:
    """Forward hooks on each model's decoder body (e.g. LlamaModel) and head (LM head / value head).

    Every body call opens a *pass*, labelled MODEL/KIND: MODEL comes from a callback (so the actor with its
    LoRA switched off counts as the reference), KIND is `train` (grad enabled), `prefill` / `decode`
    (no grad, called with use_cache=True or a KV cache: generation), else `score`. Head calls are added to
    the open pass. A pass lasts from the body's start to the end of its last head call. FLOPs per pass:
    2 * params * tokens for the body and each head call (on the positions the head sees), plus attention
    4 * layers * width * q * k per sequence; a training pass also records its backward:
    (1 + f) * matmul FLOPs + 2 * attention FLOPs, f = the trainable fraction of the hooked weights
    (1 = full fine-tuning; ~0 for a frozen base with LoRA, which needs activation gradients only)."""

    def __init__(self):
        self.records = []
        self.handles = []
        self._infos = {}  # id(body) -> what watch_body computed for it
        self._open = None
        self._starts = []

    # registration
    def watch_body(self, module, name_fn, embedding, config):
        params, trainable = _param_counts(module, exclude=[embedding.weight] if embedding is not None else [])
        import torch
        layers = getattr(module, "layers", None)
        last = layers[-1] if isinstance(layers, torch.nn.ModuleList) and len(layers) else None
        # the last layer's weights other than k and v: what runs only from a position on (from_position)
        query_params = sum(p.numel() for n, p in last.named_parameters()
                           if not _is_lora_name(n) and not any(f".{k}." in f".{n}" for k in
                                                               ("k_proj", "v_proj", "input_layernorm"))
                           ) if last is not None else 0
        info = {"name_fn": name_fn, "params": params, "frac": trainable / max(params, 1),
                "query_params": query_params,
                "layers": config.num_hidden_layers,
                "width": config.num_attention_heads * getattr(config, "head_dim",
                                                              config.hidden_size // config.num_attention_heads)}
        self.handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs: self._body_start(info, args, kwargs, m), with_kwargs=True))
        self.handles.append(module.register_forward_hook(
            lambda m, args, kwargs, out: self._body_end(), with_kwargs=True))
        self._infos[id(module)] = info
        return params

    def watch_lean_decode(self, body):
        """Our trainer computes a LLaMA-like body with its own functions, which read the weights without calling the
        body's forward: decoder.decoder_forward (training, scoring and the rollout's prompt pass) and
        LlamaDecoder.step (each decode step). Wrap both (the bench's measuring wrappers, put back on `remove`) so
        that each call on this body opens a pass like a forward would."""
        from alpaca_rlhf.deepspeed_chat.training.utils.model import decoder, llama_decoder
        watched = self._watched_bodies = getattr(self, "_watched_bodies", {})
        watched[id(body)] = self._infos[id(body)]
        if getattr(self, "_lean_wrapped", False):
            return
        self._lean_wrapped = True
        meter = self
        forward, step = decoder.decoder_forward, llama_decoder.LlamaDecoder.step

        def decoder_forward(module, input_ids, attention_mask=None, position_ids=None, **options):
            info = watched.get(id(module))
            if info is not None:
                prefill = options.get("keys_values") is not None
                meter._body_start(info, (input_ids,), {"use_cache": prefill, "_from": options.get("from_position", 0),
                                                       "_replayed": options.get("replay") is not None})
            try:
                return forward(module, input_ids, attention_mask, position_ids, **options)
            finally:
                if info is not None:
                    meter._body_end()

        def decode_step(dec, tokens, positions, attend):
            info = watched.get(id(dec.model.model))
            if info is not None:
                meter._body_start(info, (tokens.unsqueeze(1),), {"use_cache": True, "_keys": dec.length + 1})
            try:
                return step(dec, tokens, positions, attend)
            finally:
                meter._body_end()
        decoder.decoder_forward = decoder_forward
        llama_decoder.LlamaDecoder.step = decode_step
        self.handles.append(_Restore(lambda: (setattr(decoder, "decoder_forward", forward),
                                              setattr(llama_decoder.LlamaDecoder, "step", step),
                                              setattr(meter, "_lean_wrapped", False))))

    def watch_head(self, module):
        params, trainable = _param_counts(module)
        info = {"params": params, "frac": trainable / max(params, 1)}
        self.handles.append(module.register_forward_pre_hook(lambda m, args: self._head_start(info, args)))
        self.handles.append(module.register_forward_hook(lambda m, args, out: self._head_end()))
        return params

    def add_timed(self, label: str, seconds: float):
        """A non-forward piece (backward, optimizer step) timed by a wrapper."""
        self.records.append({"label": label, "calls": 1, "tokens": 0, "seconds": seconds, "flops": 0.0,
                             "backward_flops": 0.0})

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def reset(self):
        self.records, self._open = [], None

    # hooks
    def _body_start(self, info, args, kwargs, module=None):
        import torch
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:  # inputs_embeds
            ids = kwargs["inputs_embeds"][..., 0]
        B, T = ids.shape[0], ids.shape[1]
        past = kwargs.get("past_key_values")
        past_len = int(past.get_seq_length()) if past is not None and hasattr(past, "get_seq_length") else 0
        keys = kwargs.get("_keys", past_len + T)  # positions attended to (left padding: computed, then masked)
        replayed = kwargs.get("_replayed", False)   # decoder_forward(..., replay=...): matmuls from the rollout
        if torch.is_grad_enabled():
            kind = "train-replayed" if replayed else "train"
        elif kwargs.get("use_cache") is True or kwargs.get("past_key_values") is not None:
            kind = "prefill" if T > 1 else "decode"
        else:
            kind = "score"
        matmul = 2.0 * info["params"] * B * T
        attention = 4.0 * info["layers"] * info["width"] * B * T * keys
        skipped = min(kwargs.get("_from", 0), T - 1)  # decoder_forward(..., from_position=S)
        if skipped > 0:  # the last layer's queries, o_proj and MLP ran at positions skipped .. T - 1 only
            matmul -= 2.0 * info["query_params"] * B * skipped
            attention -= 4.0 * info["width"] * B * skipped * keys
        # a replayed forward (forward_replay.py) takes its matmuls' results from the rollout: attention only
        rec = {"label": f"{info['name_fn']()}/{kind}", "calls": 1, "tokens": B * T,
               "seconds": 0.0, "flops": (0.0 if replayed else matmul) + attention, "backward_flops": 0.0,
               "_t0": time.perf_counter(), "_t1": None, "replayed": replayed}
        if torch.is_grad_enabled():
            rec["backward_flops"] = (1.0 + info["frac"]) * matmul + 2.0 * attention
        self.records.append(rec)
        self._open = rec

    def _body_end(self):
        if self._open is not None:
            self._open["_t1"] = time.perf_counter()

    def _head_start(self, info, args):
        import torch
        rec = self._open
        if rec is None:
            return
        x = args[0]
        tokens = x.numel() // x.shape[-1]
        matmul = 2.0 * info["params"] * tokens
        rec["flops"] += 0.0 if rec["replayed"] else matmul
        if torch.is_grad_enabled():
            rec["backward_flops"] += (1.0 + info["frac"]) * matmul

    def _head_end(self):
        if self._open is not None:
            self._open["_t1"] = time.perf_counter()

    # results
    def by_label(self):
        """{label: {calls, tokens, seconds, flops, backward_flops}} of the records so far, in first-seen order."""
        out = OrderedDict()
        for r in self.records:
            seconds = r["seconds"] if "_t0" not in r else (r["_t1"] or time.perf_counter()) - r["_t0"]
            agg = out.setdefault(r["label"], {"calls": 0, "tokens": 0, "seconds": 0.0, "flops": 0.0,
                                              "backward_flops": 0.0})
            agg["calls"] += r["calls"]
            agg["tokens"] += r["tokens"]
            agg["seconds"] += seconds
            agg["flops"] += r["flops"]
            agg["backward_flops"] += r["backward_flops"]
        return out


class _Restore:
    """A hook handle that puts wrapped functions back."""

    def __init__(self, undo):
        self.undo = undo

    def remove(self):
        self.undo()


def timed_method(obj, attr: str, meter: PassMeter, label: str):
    """Replace obj.attr (a bound method) by a wrapper that records its wall time in the meter."""
    original = getattr(obj, attr)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            meter.add_timed(label, time.perf_counter() - t0)
    object.__setattr__(obj, attr, wrapper)


def formula_flops(n_actor: float, n_critic: float, lora: bool, B=PROMPTS_PER_ITERATION, P=PROMPT_LEN,
                  A=ANSWER_LEN):
    """The textbook count, for comparison with the counted one (attention and head subtleties ignored)."""
    L = P + A
    train_factor = 4.0 if lora else 6.0
    return OrderedDict([
        ("generation", 2.0 * n_actor * B * (P + A)),
        ("scoring", 2.0 * (2 * n_actor + 2 * n_critic) * B * L),
        ("training", train_factor * (n_actor + n_critic) * B * L),
    ])


FORMULA_TEXT = ("textbook (the classic iteration, whatever the trainer skips): generation 2N_a*B*(P+A); scoring 2*(2N_a+2N_c)*B*L (actor old log-probs, reference, "
                "critic values, reward); training {k}*(N_a+N_c)*B*L ({k}N per trained token: fwd 2N + bwd "
                "{b}N{lora}); N = non-embedding parameters incl. the LM head (N_a) or value head (N_c), "
                "LoRA matrices excluded; B=16, P=64, A=64, L=128")
COUNTED_TEXT = ("counted: forward hooks on every decoder body and head; per call 2*N_body*tokens + "
                "2*N_head*(positions the head is applied to) + attention 4*layers*width*q*k per sequence; "
                "a training call adds backward (1+f)*matmul + 2*attention, f = trainable fraction of the "
                "hooked weights (1 full fine-tuning, ~0 with a frozen base + LoRA); a train-replayed call "
                "(the actor's forward replayed from the rollout) counts attention only in its forward; where "
                "the last layer runs from position S on (decoder_forward's from_position), its non-k/v weights count T-S positions")


class Gate:
    """Lock-step control by compare_trl.py: the worker waits for a command line ('go' before each iteration,
    'end' after the last) on one pipe and answers each iteration with a JSON line on another."""

    def __init__(self, cmd_fd: int, res_fd: int):
        self.cmd = os.fdopen(cmd_fd, "r")
        self.res = os.fdopen(res_fd, "w")

    def send(self, obj):
        self.res.write(json.dumps(obj) + "\n")
        self.res.flush()

    def wait(self, expected: str):
        line = self.cmd.readline().strip()
        if line != expected:
            raise SystemExit(f"driver sent {line!r}, expected {expected!r}")


def summarize(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ------------------------------------------------------------------------------------------------ our run
def grpo_flags(group: int):
    """GRPO in the reference setting: PROMPTS_PER_ITERATION answers as 16 / K prompts x K answers, no critic (the
    critic directory is the frozen reward model), the KL to the reference as a loss term (beta 0.04, the paper's)."""
    return ["--advantage_estimator", "group_norm", "--n_samples_per_prompt", str(group),
            "--per_device_generation_batch_size", str(PROMPTS_PER_ITERATION // group),
            "--kl_coef", "0", "--kl_loss_coef", "0.04"]


def ours_argv(actor_dir, critic_dir, lora: bool, output_dir: str, seed: int, extra=(), group: int = 1):
    argv = [
        "--actor_model_name_or_path", actor_dir, "--critic_model_name_or_path", critic_dir,
        "--output_dir", output_dir, "--seed", str(seed),
        "--per_device_generation_batch_size", str(PROMPTS_PER_ITERATION),
        "--per_device_training_batch_size", str(PROMPTS_PER_ITERATION),
        "--generation_batches", "1", "--ppo_epochs", "1", "--gradient_accumulation_steps", "1",
        "--max_prompt_seq_len", str(PROMPT_LEN), "--max_answer_seq_len", str(ANSWER_LEN), "--ignore_eos",
        "--temperature", "1.0", "--top_k", "0", "--top_p", "1.0",
        "--dtype", "fp32", "--actor_zero_stage", "0", "--critic_zero_stage", "0",
        "--optimizer", "torch_adamw", "--no_reward_normalization", "--disable_progress_bar",
        "--kl_estimator", "k1", "--whiten_advantages", "true",
    ]
    if lora:
        argv += ["--actor_lora_dim", str(LORA_RANK), "--actor_lora_module_name", LORA_MODULES,
                 "--critic_lora_dim", str(LORA_RANK), "--critic_lora_module_name", LORA_MODULES,
                 "--only_optimize_lora"]
    if group > 1:
        argv += grpo_flags(group)
    return argv + list(extra)


def _lora_switch(module):
    """A callable telling whether `module`'s LoRA adapters are switched off: our lora_disabled context
    (LoRALinear.enabled) or peft's disable_adapter (LoraLayer.disable_adapters)."""
    first = next((m for m in module.modules() if hasattr(m, "lora_A")), None)
    if first is None:
        return lambda: False
    if hasattr(first, "enabled"):
        return lambda: not first.enabled
    return lambda: bool(getattr(first, "disable_adapters", False))


def attach_meter(engine, meter: PassMeter):
    """Hooks on the actor, reference, critic and reward models of a DeepSpeedRLHFEngine, plus timers around
    the engines' backward and step. Returns {'actor': N_a, 'critic': N_c} (non-embedding parameters incl.
    the head, LoRA excluded)."""
    actor = engine.actor.module
    actor_off = _lora_switch(actor)
    n_actor = meter.watch_body(actor.model, lambda: "reference" if actor_off() else "actor",
                               actor.get_input_embeddings(), actor.config)
    n_actor += meter.watch_head(actor.lm_head)
    meter.watch_lean_decode(actor.model)
    if engine.ref is not None:
        ref = engine.ref.module
        meter.watch_body(ref.model, lambda: "reference", ref.get_input_embeddings(), ref.config)
        meter.watch_head(ref.lm_head)
        meter.watch_lean_decode(ref.model)
    n_critic = 0
    if engine.critic is not None:  # (none with a critic-free --advantage_estimator)
        critic = engine.critic.module
        body = critic.rwtransformer
        critic_off = _lora_switch(body)
        n_critic = meter.watch_body(body, lambda: "reward" if critic_off() else "critic",
                                    body.get_input_embeddings(), body.config)
        n_critic += meter.watch_head(critic.v_head)
        meter.watch_lean_decode(body)
    if getattr(engine, "reward_head", None) is not None:
        meter.watch_head(engine.reward_head)
    reward = getattr(engine, "reward_model", None)
    if reward is not None and hasattr(getattr(reward, "module", None), "rwtransformer"):
        rbody = reward.module.rwtransformer
        meter.watch_body(rbody, lambda: "reward", rbody.get_input_embeddings(), rbody.config)
        meter.watch_head(reward.module.v_head)
        meter.watch_lean_decode(rbody)
    elif reward is not None:
        print("note: the reward model is not a step-2 style model; its passes are not counted", flush=True)
    for name, eng in engine.engines.items():
        timed_method(eng, "backward", meter, f"{name}/backward")
        timed_method(eng, "step", meter, f"{name}/optimizer step")
    return {"actor": n_actor, "critic": n_critic}


def run_ours(actor_dir, critic_dir, lora: bool, iterations: int, warmup: int, seed: int, threads: int,
             verbose: bool = True, gate: "Gate" = None, profile_rows: int = 0, profile_shapes: bool = False,
             trainer_args=(), group: int = 1):
    import torch
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    from deepspeed.utils import logger as ds_logger
    import logging
    ds_logger.setLevel(logging.WARNING)
    from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning import step3_args
    from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning.ppo_trainer import PPOTrainer
    from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning.rlhf_engine import DeepSpeedRLHFEngine
    from alpaca_rlhf.deepspeed_chat.training.utils.entry import start_run
    from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import tokenizer_from_args

    output_dir = tempfile.mkdtemp(prefix="ppo-bench-")
    try:
        args = step3_args.parse_args(ours_argv(actor_dir, critic_dir, lora, output_dir, seed, trainer_args, group))
        t_init = time.perf_counter()
        dist = start_run(args)  # one-rank world (gloo); may JIT-build DeepSpeed's shm_comm op the first time
        init_s = time.perf_counter() - t_init
        args.device = dist.device
        torch.set_num_threads(threads)
        tokenizer = tokenizer_from_args(args, args.actor_model_name_or_path)
        tokenizer.padding_side = "left"
        total = warmup + iterations + (1 if profile_rows else 0)
        t_setup = time.perf_counter()
        engine = DeepSpeedRLHFEngine(args, tokenizer, step3_args.optimizer_steps(args, total))
        trainer = PPOTrainer(engine, args, reward_stats=None)
        setup_s = time.perf_counter() - t_setup
        meter = PassMeter()
        n_params = attach_meter(engine, meter)
        optimizer_name = type(engine.actor.optimizer).__name__
        per_iteration = PROMPTS_PER_ITERATION // group  # prompts; each answered `group` times
        prompts = make_prompts(tokenizer, total * per_iteration, seed).to(dist.device)
        mask = torch.ones(per_iteration, PROMPT_LEN, dtype=torch.long, device=dist.device)

        records = []
        if gate is not None:
            gate.send({"ready": True})
        for i in range(total):
            batch = prompts[i * per_iteration:(i + 1) * per_iteration]
            if gate is not None:
                gate.wait("go")
            meter.reset()
            profiler = None
            if profile_rows and i == total - 1:  # one extra iteration under torch.profiler, not measured
                print(settle_heap_for_profiling())
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                  record_shapes=profile_shapes)
                profiler.__enter__()
            faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            rollout, timing = trainer.make_experience(batch, mask)
            t1 = time.perf_counter()
            if rollout is None:
                raise SystemExit("the trainer skipped the batch (non-finite logits); the benchmark needs every batch")
            answer = rollout.seq.shape[1] - PROMPT_LEN
            if answer != ANSWER_LEN or (hasattr(rollout, "action_mask") and int(rollout.action_mask.sum())
                                        != PROMPTS_PER_ITERATION * ANSWER_LEN):
                raise SystemExit(f"answers are not {ANSWER_LEN} tokens each (got {answer} columns); "
                                 "is --ignore_eos honoured?")
            trainer.step([rollout])
            t2 = time.perf_counter()
            if profiler is not None:
                profiler.__exit__(None, None, None)
                print(f"profile of iteration {i} (operators by self CPU time; the profiler's overhead included):")
                # with profile_shapes one row per operator and input shapes: which call sites cost what
                print(profiler.key_averages(group_by_input_shape=profile_shapes).table(
                    sort_by="self_cpu_time_total", row_limit=profile_rows, max_shapes_column_width=90))
            passes = meter.by_label()
            gen_s = timing.get("time/generate")
            if gen_s is None:
                gen_s = sum(v["seconds"] for k, v in passes.items() if k.endswith(("/prefill", "/decode")))
            rec = {"iteration": i, "warmup": i < warmup or profiler is not None,  # the profiled one is not measured
                   "total_s": t2 - t0, "generate_s": gen_s,
                   "score_s": (t1 - t0) - gen_s, "train_s": t2 - t1, "passes": passes,
                   # first touches of fresh memory: each one a kernel page fault (4 KiB zeroed)
                   "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0}
            records.append(rec)
            if gate is not None:
                gate.send({"iteration": i, "total_s": rec["total_s"]})
            if verbose:
                print(f"iteration {i}{' (warm-up)' if i < warmup else ''}: {rec['total_s']:.2f} s "
                      f"(generate {gen_s:.2f}, score {rec['score_s']:.2f}, train {rec['train_s']:.2f}; "
                      f"{rec['page_faults']} page faults)", flush=True)
        if gate is not None:
            gate.wait("end")  # nothing below overlaps the other framework's iterations
        meter.remove()
        peak = peak_rss_mib()
        return {"records": records, "n_params": n_params, "setup_s": setup_s, "init_s": init_s, "peak_rss_mib": peak,
                "optimizer": optimizer_name}
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ report
def build_report(framework: str, setting: dict, run: dict, matmul=None, formula=None):
    measured = [r for r in run["records"] if not r["warmup"]] or run["records"]
    total = summarize([r["total_s"] for r in measured])
    gen = statistics.median(r["generate_s"] for r in measured)
    report = {
        "framework": framework, "setting": setting,
        "iterations_measured": len(measured),
        "seconds_per_iteration": total,
        "prompts_per_hour": PROMPTS_PER_ITERATION // setting.get("group", 1) * 3600.0 / total["median"],
        "generate_s": gen, "generation_tokens_per_s": PROMPTS_PER_ITERATION * ANSWER_LEN / gen,
        "score_s": statistics.median(r["score_s"] for r in measured),
        "train_s": statistics.median(r["train_s"] for r in measured),
        "peak_rss_mib": run["peak_rss_mib"],
        "records": run["records"],
    }
    for key in ("n_params", "setup_s", "init_s", "optimizer"):
        if key in run:
            report[key] = run[key]
    # per-pass medians over the measured iterations (calls, tokens and FLOPs are the same every iteration)
    labels = list(OrderedDict.fromkeys(k for r in measured for k in r["passes"]))
    passes = OrderedDict()
    for label in labels:
        rows = [r["passes"][label] for r in measured if label in r["passes"]]
        passes[label] = {"calls": rows[-1]["calls"], "tokens": rows[-1]["tokens"],
                         "seconds": statistics.median(x["seconds"] for x in rows),
                         "flops": rows[-1]["flops"], "backward_flops": rows[-1]["backward_flops"]}
    report["passes"] = passes
    counted = sum(p["flops"] + p["backward_flops"] for p in passes.values())
    if counted:
        phase = OrderedDict([("generation", 0.0), ("scoring", 0.0), ("training", 0.0)])
        for label, p in passes.items():
            kind = label.rsplit("/", 1)[-1]
            key = {"prefill": "generation", "decode": "generation", "score": "scoring", "train": "training",
                   "train-replayed": "training"}.get(kind)
            if key:
                phase[key] += p["flops"] + p["backward_flops"]
        report["flops"] = {"counted_per_iteration": counted, "counted_by_phase": phase, "counted_method": COUNTED_TEXT,
                           "achieved_flops_per_s": counted / total["median"]}
        if formula is not None:
            report["flops"]["formula_by_phase"] = formula
            report["flops"]["formula_per_iteration"] = sum(formula.values())
            report["flops"]["formula_flops_per_s"] = sum(formula.values()) / total["median"]
            report["flops"]["formula_method"] = FORMULA_TEXT.format(
                k=4 if setting.get("lora") else 6, b=2 if setting.get("lora") else 4,
                lora=" (frozen base: activation grads only)" if setting.get("lora") else "")
        if matmul is not None:
            report["matmul_gflops_best"], report["matmul_gflops_median"] = matmul
            report["flops"]["fraction_of_matmul_rate"] = counted / total["median"] / (matmul[0] * 1e9)
            if formula is not None:
                report["flops"]["formula_fraction_of_matmul_rate"] = (sum(formula.values()) / total["median"]
                                                                      / (matmul[0] * 1e9))
    return report


def print_report(r: dict):
    s = r["setting"]
    print()
    k = s.get("group", 1)
    rows_text = (f"{PROMPTS_PER_ITERATION} prompts" if k == 1
                 else f"GRPO, {PROMPTS_PER_ITERATION // k} prompts x {k} answers")
    print(f"== {r['framework']}: preset {s['preset']}{' + LoRA' if s.get('lora') else ''}, "
          f"{rows_text} x ({PROMPT_LEN} prompt + {ANSWER_LEN} answer tokens), fp32, "
          f"{s['threads']} threads, {r['iterations_measured']} iterations after {s['warmup']} warm-up ==")
    t = r["seconds_per_iteration"]
    rows = [
        ("seconds / iteration (median)", f"{t['median']:.3f}"),
        ("seconds / iteration (min, max)", f"{t['min']:.3f}, {t['max']:.3f}"),
        ("prompts / hour", f"{r['prompts_per_hour']:.0f}"),
        ("generation", f"{r['generate_s']:.3f} s, {r['generation_tokens_per_s']:.1f} tokens/s"),
        ("scoring", f"{r['score_s']:.3f} s"),
        ("training", f"{r['train_s']:.3f} s"),
        ("peak resident memory", f"{r['peak_rss_mib']:.0f} MiB"),
    ]
    if "optimizer" in r:
        rows.append(("optimizer", r["optimizer"]))
    if "blas" in r:
        rows.append(("BLAS", r["blas"]))
    if "init_s" in r:
        rows.append(("start-up (not timed above)", f"world init {r['init_s']:.1f} s, engines {r['setup_s']:.1f} s"))
    if "n_params" in r:
        rows.append(("N (non-embedding incl. head)", ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in r["n_params"].items())))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if r.get("passes"):
        print("\n  per pass (median s per iteration)        calls   tokens   seconds   GFLOP fwd(+bwd)   GFLOP/s")
        for label, p in r["passes"].items():
            gfl = (p["flops"] + p["backward_flops"]) / 1e9
            fl = f"{p['flops'] / 1e9:.2f}" + (f"+{p['backward_flops'] / 1e9:.2f}" if p["backward_flops"] else "")
            rate = f"{gfl / p['seconds']:.1f}" if p["seconds"] > 0 and gfl else "-"
            print(f"  {label:<40} {p['calls']:>5} {p['tokens']:>8} {p['seconds']:>9.3f}   {fl:>15}   {rate:>7}")
    f = r.get("flops")
    if f:
        print(f"\n  FLOPs / iteration (counted): {f['counted_per_iteration'] / 1e9:.2f} GFLOP  ("
              + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in f["counted_by_phase"].items()) + ")")
        if "formula_per_iteration" in f:
            print(f"  FLOPs / iteration (formula): {f['formula_per_iteration'] / 1e9:.2f} GFLOP  ("
                  + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in f["formula_by_phase"].items()) + ")")
        line = f"  achieved: {f['achieved_flops_per_s'] / 1e9:.2f} GFLOP/s"
        if "fraction_of_matmul_rate" in f:
            line += (f" = {100 * f['fraction_of_matmul_rate']:.1f}% of the measured fp32 matmul rate "
                     f"{r['matmul_gflops_best']:.1f} GFLOP/s (2048^2, best; median {r['matmul_gflops_median']:.1f})")
        print(line)
        if "formula_flops_per_s" in f:
            line = f"  textbook-equivalent (MFU-style): {f['formula_flops_per_s'] / 1e9:.2f} GFLOP/s"
            if "formula_fraction_of_matmul_rate" in f:
                line += f" = {100 * f['formula_fraction_of_matmul_rate']:.1f}% of the matmul rate"
            print(line + " (skipping passes raises this one, not the counted one)")
        print(f"  {f['counted_method']}")
        if "formula_method" in f:
            print(f"  {f['formula_method']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny", help="Reference model size. Default tiny.")
    p.add_argument("--lora", action="store_true", help="LoRA rank 8 on q_proj,k_proj for actor and critic, "
                                                       "--only_optimize_lora.")
    p.add_argument("--model", default=None, help="Actor (causal LM) directory; default: bench/.models/PRESET, "
                                                 "built with make_tiny_model on first use.")
    p.add_argument("--critic_model", default=None, help="Critic/reward directory (sequence-classification export); "
                                                        "default: exported from --model with a random head.")
    p.add_argument("--iterations", type=int, default=5, help="Measured iterations. Default 5.")
    p.add_argument("--warmup", type=int, default=1, help="Iterations run first and not counted. Default 1.")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads (the reference setting: 2).")
    p.add_argument("--output_json", default=None, help="Also write the results (per-iteration records too) here.")
    p.add_argument("--quiet", action="store_true", help="No per-iteration lines and no table (with --output_json).")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="Run one more, unmeasured iteration under torch.profiler and print its top ROWS "
                        "operators. Default 0.")
    p.add_argument("--profile_shapes", action="store_true",
                   help="With --profile: one row per operator and input shapes (e.g. the decode step's 16-row "
                        "products apart from the training passes' 2032-row ones).")
    p.add_argument("--no_matmul", action="store_true", help="Skip the matmul-rate measurement (and FLOP/s fractions).")
    p.add_argument("--trainer_args", default="", metavar="'FLAGS'",
                   help="More step-3 flags for our trainer, appended to the reference setting's, e.g. "
                        "--trainer_args='--recompute_actor_forward' "
                        "(bench/ab_flags.py compares two such runs interleaved).")
    p.add_argument("--group", type=int, default=1, metavar="K",
                   help="K > 1: GRPO instead of PPO, the 16 answers as 16 / K prompts x K answers, no critic, KL as a "
                        "loss term (beta 0.04). Default 1 (PPO).")
    p.add_argument("--stock_blas", action="store_true",
                   help="Leave torch's MKL as it comes instead of correcting its kernel choice on AMD processors "
                        "(alpaca_rlhf/cpu_blas.py, on in every entry point of ours): what the correction buys "
                        "(bench/ab_flags.py --a_stock_blas). No difference on Intel processors.")
    p.add_argument("--_cmd_fd", type=int, default=None, help=argparse.SUPPRESS)  # lock-step worker of compare_trl.py
    p.add_argument("--_res_fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_export_reward", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._export_reward:
        export_reward_model(*args._export_reward)
        return 0
    if args.iterations < 1 or args.warmup < 0:
        p.error("--iterations must be >= 1 and --warmup >= 0")
    if args.group < 1 or PROMPTS_PER_ITERATION % args.group:
        p.error(f"--group must divide {PROMPTS_PER_ITERATION}")
    if args.profile_shapes and not args.profile:
        p.error("--profile_shapes needs --profile ROWS (how many rows of the profile to print)")
    set_threads(args.threads)
    blas_setup(stock=args.stock_blas)  # (puts the repository on sys.path too)
    actor_dir, critic_dir = prepare_models(args.preset, args.model, args.critic_model)
    setting = {"preset": args.preset, "lora": args.lora, "model": actor_dir, "critic_model": critic_dir,
               "prompts": PROMPTS_PER_ITERATION, "prompt_len": PROMPT_LEN, "answer_len": ANSWER_LEN,
               "threads": args.threads, "iterations": args.iterations, "warmup": args.warmup, "seed": args.seed,
               "trainer_args": args.trainer_args, "group": args.group}
    gate = Gate(args._cmd_fd, args._res_fd) if args._cmd_fd is not None else None
    run = run_ours(actor_dir, critic_dir, args.lora, args.iterations, args.warmup, args.seed, args.threads,
                   verbose=not args.quiet, gate=gate, profile_rows=args.profile,
                   profile_shapes=args.profile_shapes,
                   trainer_args=shlex.split(args.trainer_args), group=args.group)
    # after the run: its buffers do not count in the peak memory above
    matmul = None if args.no_matmul else matmul_gflops()
    formula = (formula_flops(run["n_params"]["actor"], run["n_params"]["critic"], args.lora) if args.group == 1
               else None)  # (the textbook formula is PPO's)
    report = build_report("ours", setting, run, matmul, formula)
    report["blas"] = blas_status()
    if not args.quiet:
        print_report(report)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=1)
    try:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

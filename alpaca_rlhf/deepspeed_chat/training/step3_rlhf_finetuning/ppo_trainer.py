"""PPO for the actor/critic engines of rlhf_engine.py. One rollout goes through these numbered steps:

    1. generate      sample answers to left-padded prompts (dropout off, LoRA fused for speed)
    2. cut at EOS    everything after the first EOS becomes padding; action mask up to and incl. the EOS
    3. score         each reward source (a reward model's value at the last real token, a function, a server),
                     normalised (step 2's statistics), weighted (--reward_weights), summed, clipped
    4. KL reward     per-token -kl_coef * KL(actor || reference), the score added at the final action
    5. whiten        optionally whiten the rewards (--whiten_rewards)
    6. GAE           advantages and returns from the critic's values (gamma, lambda)
    7. update        --ppo_epochs over mini-batches: clipped policy loss (+ PTX), clipped value loss

Without a critic (--advantage_estimator other than gae) step 1 samples --n_samples_per_prompt answers per prompt,
steps 5-6 become the estimator's shaping of each group's scores and token-level returns
(ppo_math.critic_free_advantages), and step 7 has no value loss (optionally a KL loss term, --kl_loss_coef).

With one PPO epoch and one mini-batch per iteration (and no dropout), pi_old and V_old are exactly what the
first training forward computes, since no optimizer step happens between generation and that forward. Then the
actor and critic experience passes are skipped and steps 4-6 run inside the update on the detached outputs of
the training forwards (two of the iteration's ~eleven forward-equivalents saved; --separate_experience_passes
turns this off, and a test checks that both give the same update). For the same reason the actor's training
forward is the rollout's own forward over the same positions: generation records its linear maps' outputs and
the update replays them instead of recomputing them (utils/model/forward_replay.py; --recompute_actor_forward
turns this off).

Notation: P = prompt length (fixed, prompts are left-padded to it), A = answer length, L = P + A.
Answer token i sits at sequence position P + i; it is predicted by the logits at position P + i - 1, and
the critic's value for that action is its output at position P + i - 1 as well. So the actor, reference and
critic passes read positions 0 .. L - 2 only (the last token is an action, never an input that matters).
"""
import contextlib
import time
from dataclasses import dataclass, fields
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from alpaca_rlhf.deepspeed_chat.training.utils.losses import (gather_log_probs, masked_mean,
                                                              position_ids_from_mask)
from alpaca_rlhf.deepspeed_chat.training.utils.loop import NonFiniteGuard
from alpaca_rlhf.deepspeed_chat.training.utils.model.decoder import causal_lm_logits
from alpaca_rlhf.deepspeed_chat.training.utils.model.forward_replay import ForwardRecording
from alpaca_rlhf.deepspeed_chat.training.utils.model.generation import sample
from alpaca_rlhf.deepspeed_chat.training.utils.model.token_log_probs import answer_nll
from alpaca_rlhf.deepspeed_chat.training.utils.module.lora import has_lora, lora_fused
from alpaca_rlhf.deepspeed_chat.training.utils.utils import any_rank, get_all_reduce_mean, print_rank_0
from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning.ppo_math import (
    AdaptiveKLController, FixedKLController, aggregate_loss, clipped_value_loss, combine_scores, compute_gae,
    compute_rewards, critic_free_advantages, cut_at_eos, explained_variance, kl_penalty, masked_whiten,
    normalize_score, ppo_policy_loss)


@dataclass
class Rollout:
    """The experience of one generation batch; tensors are (B, L) or (B, A) unless noted."""
    seq: torch.Tensor             # (B, L) prompt + answer, padding after the EOS
    attention_mask: torch.Tensor  # (B, L)
    action_mask: torch.Tensor     # (B, A) float, 1 on answer tokens up to and including the first EOS
    ref_logprobs: torch.Tensor    # (B, A) log pi_ref(answer token)
    score: torch.Tensor           # (B,) normalised, clipped reward-model score (+ no-EOS penalty)
    raw_score: torch.Tensor       # (B, S) each reward source's score as it came
    ended: torch.Tensor           # (B,) bool, the answer emitted an EOS
    prompt_length: int
    # the actor's linear maps during generation, replayed by the first training forward (or None)
    recording: Optional[ForwardRecording] = None
    # steps 4-6: filled by make_experience, or by the first training forward when that is reused
    logprobs: Optional[torch.Tensor] = None    # (B, A) log pi_old(answer token)
    values: Optional[torch.Tensor] = None      # (B, A) V_old, zero after the EOS
    rewards: Optional[torch.Tensor] = None     # (B, A)
    advantages: Optional[torch.Tensor] = None  # (B, A)
    returns: Optional[torch.Tensor] = None     # (B, A)

    def select(self, index: torch.Tensor) -> "Rollout":
        """The rows `index` (a mini-batch); a recording covers the whole batch and stays behind."""
        picked = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "recording"}
        return Rollout(**{k: (v[index] if torch.is_tensor(v) else v) for k, v in picked.items()})

    def fill(self, **tensors):
        for name, value in tensors.items():
            setattr(self, name, value)


class PPOTrainer:
    def __init__(self, engine, args, reward_stats: Optional[List[Optional[dict]]] = None, ptx_batches=None,
                 ground_truth: Optional[Callable] = None, stop_token_id: Optional[int] = None):
        self.engine, self.args = engine, args
        self.actor, self.critic = engine.actor, engine.critic
        self.tokenizer = engine.tokenizer
        # the token that ends an answer: EOS, or the chat template's end of turn (stop_token_id, chat_template.py)
        self.eos = self.tokenizer.eos_token_id if stop_token_id is None else stop_token_id
        self.pad = self.tokenizer.pad_token_id
        # -1 (never sampled) with --ignore_eos
        self.stop = -1 if args.ignore_eos else self.eos
        # per --reward_model_type source: {"mean", "std"} to normalise its scores with, or None (raw scores)
        self.reward_stats = reward_stats or [None] * len(args.reward_model_type)
        self.kl_ctl = (AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon) if args.kl_target
                       else FixedKLController(args.kl_coef))
        self.ptx_batches = ptx_batches    # iterator of SFT batches for PTX mixing, or None
        # (prompts, answers) -> scores (B,), logged and never trained on (--eval_reward_function; the demo's grader)
        self.ground_truth = ground_truth
        self.group_size = args.n_samples_per_prompt  # answers per prompt, side by side in a rollout
        self.nonfinite_skipped = 0   # rollouts skipped for non-finite logits
        self.guard = NonFiniteGuard(args.max_nonfinite_steps, "step3 ppo")  # updates skipped for non-finite losses
        self.ptx_consumed = 0        # PTX batches used so far
        self.device = self.actor.device
        self.reuse_first_forward = reuses_first_forward(args)
        # replay needs the lean decode step on unpartitioned weights (the generate path that fuses LoRA)
        self.replay_actor_forward = (self.reuse_first_forward and not args.recompute_actor_forward
                                     and not args.enable_hybrid_engine and engine.actor_spec.zero_stage < 3)
        self._recording_buffers = None
        self._replay_reported = False

    # ------------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """What a resumed run needs besides the engines and the data position (a JSON-able dict)."""
        return {"kl_ctl": self.kl_ctl.state_dict(), "nonfinite_skipped": self.nonfinite_skipped,
                "nonfinite_updates": self.guard.state_dict(), "ptx_consumed": self.ptx_consumed}

    def load_state_dict(self, state: dict):
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.nonfinite_skipped = state["nonfinite_skipped"]
        self.guard.load_state_dict(state["nonfinite_updates"])
        if self.ptx_batches is not None:  # the PTX stream continues where the checkpoint left it
            for _ in range(state.get("ptx_consumed", 0)):
                next(self.ptx_batches)
        self.ptx_consumed = state.get("ptx_consumed", 0)

    # ------------------------------------------------------------------------------------------- forwards
    def _values(self, critic, seq, attention_mask, P):
        # positions P-1 .. L-2, the value before each action; the last layer computes only those (from_position)
        values = critic.forward_value(seq[:, :-1], attention_mask[:, :-1], return_value_only=True,
                                      from_position=P - 1)              # (B, A)
        return values.float()

    # ------------------------------------------------------------------------------------------- rollout
    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, prompt_mask: torch.Tensor, do_sample: bool = True,
                 record: bool = False):
        """Step 1. Returns (sequences (B, L), non-finite-logits flag, recording): with `record`, the actor's
        linear maps at every position fed, for the update to replay (None where the model does not qualify)."""
        a = self.args
        module = self.actor.module
        self.actor.eval()
        if a.enable_hybrid_engine:  # GPU only: DeepSpeed's inference kernels run HF generate on the actor
            seq = self.actor.generate(prompts, attention_mask=prompt_mask, max_new_tokens=a.max_answer_seq_len,
                                      do_sample=do_sample, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                      begin_suppress_tokens=[self.eos], eos_token_id=self.eos,
                                      pad_token_id=self.pad, synced_gpus=self.engine.actor_spec.zero_stage == 3)
            # The hybrid engine's eval() swapped its inference kernels in; its train() swaps the training layers
            # back for the log-prob passes that follow, then the module alone goes to eval (no dropout there).
            self.actor.train()
            module.eval()
            return seq, False, None
        # Fusing LoRA makes rollouts run at plain-model speed (what DeepSpeed's hybrid engine does on GPUs).
        # Under ZeRO-3 the fused weights would have to be gathered and re-partitioned: generate unfused.
        fuse = has_lora(module) and self.engine.actor_spec.zero_stage < 3
        with (lora_fused(module) if fuse else contextlib.nullcontext()):
            # (the model as it generates: a recording needs the lean decode step, which needs LoRA fused)
            # (the last rollout's buffers are written again: its update, and so its graph, is over by now)
            recording = (ForwardRecording.for_model(module, prompts.size(0), prompts.size(1), a.max_answer_seq_len,
                                                    reuse=self._recording_buffers) if record else None)
            if recording is not None:
                self._recording_buffers = recording.buffers
            seq, nonfinite = sample(module, prompts, prompt_mask, a.max_answer_seq_len, self.stop, self.pad,
                                    do_sample=do_sample, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                    suppress_eos_first=self.stop >= 0, synced=self.engine.actor_spec.zero_stage == 3,
                                    recording=recording)
        return seq, nonfinite, (recording if recording is not None and recording.complete else None)

    def cut_at_eos(self, seq: torch.Tensor, prompt_mask: torch.Tensor):
        """Step 2. Tokens after the first EOS become padding. Returns (seq, attention mask (B, L),
        action mask (B, A) float, ended (B,) bool)."""
        P = prompt_mask.size(1)
        answer, action_mask, ended = cut_at_eos(seq[:, P:], self.stop, self.pad)
        seq = torch.cat([seq[:, :P], answer], dim=1)
        attention_mask = torch.cat([prompt_mask, action_mask.long()], dim=1)
        return seq, attention_mask, action_mask, ended

    def combined_score(self, raw: torch.Tensor) -> torch.Tensor:
        """The sources' scores (B, S) as one (B,): with one source its raw score, with several the weighted sum
        of their normalised scores (--reward_weights)."""
        if raw.size(1) == 1:
            return raw[:, 0]
        return combine_scores(raw, self.reward_stats, self.args.reward_weights)

    def normalize_score(self, raw: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        """Step 3 (after the reward sources, raw (B, S)): each source normalised with its statistics (step 2's
        for a reward model), weighted and summed, no-EOS penalty, clipped. -> (B,)"""
        combined = combine_scores(raw, self.reward_stats, self.args.reward_weights)
        return normalize_score(combined, ended, None, self.args.reward_clip, self.args.no_eos_penalty)

    @torch.no_grad()
    def make_experience(self, prompts: torch.Tensor, prompt_mask: torch.Tensor):
        """Steps 1-3 (and 4-6 unless the update's first forward is reused) for one batch of prompts. Returns
        (Rollout, timings) or (None, timings) when the batch was skipped because the policy produced non-finite
        logits on some rank."""
        P = prompt_mask.size(1)
        if self.group_size > 1:  # K answers per prompt, next to each other (one group never leaves this rank)
            prompts = prompts.repeat_interleave(self.group_size, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(self.group_size, dim=0)
        t0 = time.time()
        seq, nonfinite, recording = self.generate(prompts, prompt_mask,                       # 1. generate
                                                  record=self.replay_actor_forward)
        t_gen = time.time() - t0
        if self.replay_actor_forward and not self._replay_reported:
            self._replay_reported = True
            print_rank_0("actor's first training forward: " + (
                "replayed from the rollout's own forward" if recording is not None else
                "recomputed (this model's rollouts cannot be recorded: not a plain LLaMA on the lean decode step, "
                "gradient checkpointing or LoRA dropout)"))
        if any_rank(nonfinite, self.device):
            self.nonfinite_skipped += 1
            print_rank_0(f"warning: non-finite logits during generation; batch skipped "
                         f"({self.nonfinite_skipped} so far)")
            return None, {"time/generate": t_gen}
        seq, attention_mask, action_mask, ended = self.cut_at_eos(seq, prompt_mask)           # 2. cut at EOS
        t1 = time.time()
        raw_score = self.engine.reward_scores(seq, attention_mask, P, ended)                  # 3. score
        if any_rank(not bool(torch.isfinite(raw_score).all()), self.device):  # a reward function's NaN, say
            self.nonfinite_skipped += 1
            print_rank_0(f"warning: non-finite rewards; batch skipped on every rank ({self.nonfinite_skipped} so far)")
            return None, {"time/generate": t_gen}
        score = self.normalize_score(raw_score, ended)
        with self.engine.reference_context():
            ref_logprobs = answer_log_probs(self.engine.reference_model, seq, attention_mask, P)
        rollout = Rollout(seq, attention_mask, action_mask, ref_logprobs, score, raw_score, ended, P, recording)
        if not self.reuse_first_forward:  # pi_old and V_old now; otherwise the update's first forward gives them
            logprobs = answer_log_probs(self.actor.module, seq, attention_mask, P)
            values = None
            if self.critic is not None:
                self.critic.eval()
                values = self._values(self.critic.module, seq, attention_mask, P)
            self.advantages(rollout, logprobs, values)
        return rollout, {"time/generate": t_gen, "time/score": time.time() - t1}

    def advantages(self, r: Rollout, logprobs: torch.Tensor, values: Optional[torch.Tensor]) -> None:
        """Steps 4-6 from pi_old log-probs and V_old values (B, A), stored in the rollout. Without a critic
        (values None) the critic-free estimator replaces steps 5-6: the score shaped within each group of
        answers to one prompt, the KL at every token, summed to returns (ppo_math.critic_free_advantages)."""
        a = self.args
        kl = kl_penalty(logprobs, r.ref_logprobs, a.kl_estimator)                             # 4. KL reward
        if values is None:
            advantages, returns = critic_free_advantages(r.score, kl, r.action_mask, self.kl_ctl.value,
                                                         self.group_size, a.advantage_estimator, a.gamma)
            r.fill(logprobs=logprobs, advantages=advantages, returns=returns)  # no values, no per-token rewards
            return
        values = values * r.action_mask                                                       # zero after EOS
        rewards = compute_rewards(r.score, kl, r.action_mask, self.kl_ctl.value)
        if a.whiten_rewards:                                                                   # 5. whiten
            rewards = masked_whiten(rewards, r.action_mask, shift_mean=False)
        advantages, returns = compute_gae(values, rewards, r.action_mask, a.gamma, a.lam)     # 6. GAE
        r.fill(logprobs=logprobs, values=values, rewards=rewards, advantages=advantages, returns=returns)

    # ------------------------------------------------------------------------------------------- update
    def _ptx_loss(self):
        batch = next(self.ptx_batches)
        self.ptx_consumed += 1  # the PTX data position, saved with checkpoints
        batch = {k: v.to(self.device) for k, v in batch.items()}
        nll, tokens = answer_nll(self.actor, batch, self.args.packing, self.args.logits_chunk)  # as step 1's loss
        return nll / tokens.clamp(min=1)

    def train_rlhf(self, mb: Rollout) -> Dict[str, float]:
        """Step 7 on one mini-batch: one actor step and one critic step. The PTX loss joins the policy loss
        in the same backward, so it does not add to the actor's gradient-accumulation count. A rollout without
        pi_old / V_old (reuse_first_forward) gets them, and steps 4-6, from these forwards."""
        a, P = self.args, mb.prompt_length
        mask = mb.action_mask
        self.actor.train()
        if self.critic is not None:
            self.critic.train()
        recording, mb.recording = mb.recording, None  # used once: afterwards its buffers belong to the graph
        logprobs = answer_log_probs(self.actor, mb.seq, mb.attention_mask, P, replay=recording)
        values = None
        if mb.logprobs is None:  # reused first forward: pi_old = this policy, V_old = this critic (detached)
            if self.critic is not None:
                values = self._values(self.critic, mb.seq, mb.attention_mask, P)
            self.advantages(mb, logprobs.detach(), None if values is None else values.detach())
        # GAE's advantages are whitened per mini-batch (--whiten_advantages); the critic-free estimators' are
        # used as their estimator defines them
        gae = self.critic is not None
        advantages = masked_whiten(mb.advantages, mask) if gae and a.whiten_advantages else mb.advantages
        policy_loss, clipfrac, approxkl = ppo_policy_loss(logprobs, mb.logprobs, advantages, mask, a.cliprange,
                                                          a.loss_agg, a.max_answer_seq_len)
        actor_loss = policy_loss
        kl_loss = None
        if a.kl_loss_coef > 0:  # GRPO's KL term in the loss (instead of, or besides, the KL in the reward)
            kl_loss = aggregate_loss(kl_penalty(logprobs, mb.ref_logprobs, a.kl_loss_estimator), mask, a.loss_agg,
                                     a.max_answer_seq_len)
            actor_loss = actor_loss + a.kl_loss_coef * kl_loss
        ptx = None
        if self.ptx_batches is not None and a.unsup_coef > 0:
            ptx = self._ptx_loss()
            actor_loss = actor_loss + a.unsup_coef * ptx
        # a NaN or infinity in the rewards, values, advantages or log-probs reaches this loss: skip the
        # mini-batch on every rank rather than step with it (and stop after --max_nonfinite_steps in a row)
        if not self.guard.ok(actor_loss, self.actor.global_steps, "policy loss (from rewards, values, advantages)"):
            return {"train/nonfinite_skipped": float(self.guard.skipped)}
        self.actor.backward(actor_loss)
        steps_before = self.actor.global_steps
        self.actor.step()
        if self.actor.global_steps != steps_before:  # an optimizer step happened (accumulation boundary)
            self.engine.update_ema(a.ema_decay)
        stats = {"loss/policy": policy_loss.item(), "train/nonfinite_skipped": float(self.guard.skipped),
                 "policy/clipfrac": clipfrac.item(), "policy/approxkl": approxkl.item()}
        if kl_loss is not None:
            stats["loss/kl"] = kl_loss.item()
        if ptx is not None:
            stats["loss/ptx"] = ptx.item()
        if self.critic is None:
            return stats

        if values is None:
            values = self._values(self.critic, mb.seq, mb.attention_mask, P)
        value_loss, vclipfrac = clipped_value_loss(values, mb.values, mb.returns, mask, a.cliprange_value)
        if not self.guard.ok(value_loss, self.critic.global_steps, "value loss"):
            return {"train/nonfinite_skipped": float(self.guard.skipped)}
        self.critic.backward(value_loss)
        self.critic.step()
        return {**stats, "loss/value": value_loss.item(), "val/clipfrac": vclipfrac.item()}

    def rollout_stats(self, r: Rollout) -> Dict[str, float]:
        """Metrics of the experience itself (before the update)."""
        mask = r.action_mask
        extra = {}
        if self.ground_truth is not None:  # the sampled answers' true quality, next to the reward model's opinion
            extra["reward/ground_truth"] = self.ground_truth(*self.engine.decode(r.seq, r.prompt_length)).mean().item()
        if r.raw_score.size(1) > 1:  # several sources: each one's own mean
            for s, source in enumerate(self.args.reward_model_type):
                extra[f"reward/raw_{source}"] = r.raw_score[:, s].mean().item()
        if self.critic is not None:
            extra["val/explained_variance"] = explained_variance(r.values, r.returns, mask).item()
            extra["val/mean"] = masked_mean(r.values, mask).item()
        lengths = mask.sum(-1) - r.ended.float()                      # answer tokens without the EOS
        kl_per_seq = (kl_penalty(r.logprobs, r.ref_logprobs, self.args.kl_estimator) * mask).sum(-1)
        return {
            "reward/score": r.score.mean().item(),
            "reward/score_raw": self.combined_score(r.raw_score).mean().item(),
            "objective/kl": kl_per_seq.mean().item(), "objective/kl_coef": self.kl_ctl.value,
            "objective/entropy": masked_mean(-r.logprobs, mask).item(),  # sampled-token estimate, per token
            "gen/response_len": lengths.mean().item(), "gen/response_len_min": lengths.min().item(),
            "gen/empty_frac": (lengths == 0).float().mean().item(),
            "gen/no_eos_frac": (~r.ended).float().mean().item(), **extra,
        }

    def step(self, rollouts: List[Rollout]) -> Dict[str, float]:
        """Train on the rollouts collected for one PPO iteration; returns metrics averaged over ranks."""
        a = self.args
        t0 = time.time()
        per_update: List[Dict[str, float]] = []
        for _ in range(a.ppo_epochs):
            for r in rollouts:
                if r.seq.size(0) <= a.per_device_training_batch_size:  # one mini-batch: nothing to shuffle
                    per_update.append(self.train_rlhf(r))
                    continue
                order = torch.randperm(r.seq.size(0), device=r.seq.device)
                for start in range(0, r.seq.size(0), a.per_device_training_batch_size):
                    per_update.append(self.train_rlhf(r.select(order[start:start + a.per_device_training_batch_size])))
        stats = _mean_dicts([self.rollout_stats(r) for r in rollouts] + [_mean_dicts(per_update)])
        stats["time/train"] = time.time() - t0
        stats["gen/nonfinite_skipped"] = float(self.nonfinite_skipped)
        keys = sorted(stats)
        reduced = get_all_reduce_mean(torch.tensor([stats[k] for k in keys], device=self.device,
                                                   dtype=torch.float64)).tolist()
        stats = dict(zip(keys, reduced))
        n = sum(r.seq.size(0) for r in rollouts) * (dist.get_world_size() if dist.is_initialized() else 1)
        self.kl_ctl.update(stats["objective/kl"], n)
        return stats

    # ------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, loader, max_batches: int = 0, num_samples: int = 0) -> Dict[str, object]:
        """Greedy answers to held-out prompts: reward (raw and normalised), KL to the reference on those
        answers, length, empty / unfinished fractions and, where given, a ground-truth score."""
        sums: Dict[str, float] = {}
        samples = []
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            prompts, prompt_mask = batch["prompt"].to(self.device), batch["prompt_att_mask"].to(self.device)
            seq, _, _ = self.generate(prompts, prompt_mask, do_sample=False)
            seq, attention_mask, action_mask, ended = self.cut_at_eos(seq, prompt_mask)
            P = prompt_mask.size(1)
            raw = self.engine.reward_scores(seq, attention_mask, P, ended)
            logprobs = answer_log_probs(self.actor.module, seq, attention_mask, P)
            with self.engine.reference_context():
                ref = answer_log_probs(self.engine.reference_model, seq, attention_mask, P)
            lengths = action_mask.sum(-1) - ended.float()
            prompt_texts, answers = self.engine.decode(seq, P)
            combined = self.combined_score(raw)                              # (B,)
            batch_sums = {"reward": combined.sum().item(), "reward_normalized": self.normalize_score(raw, ended).sum().item(),
                          "kl_to_reference": ((logprobs - ref) * action_mask).sum().item(),
                          "response_len": lengths.sum().item(), "empty_frac": (lengths == 0).sum().item(),
                          "no_eos_frac": (~ended).sum().item(), "count": float(len(answers))}
            if self.ground_truth is not None:
                batch_sums["ground_truth"] = self.ground_truth(prompt_texts, answers).sum().item()
            for k, v in batch_sums.items():
                sums[k] = sums.get(k, 0.0) + v
            samples.extend(zip(prompt_texts, answers, combined.tolist()))
        keys = sorted(sums)
        totals = dict(zip(keys, get_all_reduce_mean(torch.tensor([sums[k] for k in keys], device=self.device,
                                                                  dtype=torch.float64)).tolist()))
        count = max(totals.pop("count", 0.0), 1.0)
        result: Dict[str, object] = {f"eval/{k}": v / count for k, v in totals.items()}
        result["samples"] = samples[:num_samples]
        return result


def answer_log_probs(model, seq: torch.Tensor, attention_mask: torch.Tensor, P: int, replay=None) -> torch.Tensor:
    """log pi(answer tokens) of sequences (B, L) whose answers start at column P: only the A positions that
    predict them go through the LM head. replay: the rollout's ForwardRecording (forward_replay.py). -> (B, A)"""
    # positions P-1 .. L-2 predict the answer tokens P .. L-1; position L-1 predicts nothing and is left out
    # (the last decoder layer and the LM head compute only those A positions: earlier ones serve as keys and
    # values only; asking for them rather than slicing the logits afterwards, whose backward would zero-fill and
    # copy a gradient of the full logits' size)
    logits = causal_lm_logits(model, seq[:, :-1], attention_mask[:, :-1],
                              position_ids_from_mask(attention_mask)[:, :-1], from_position=P - 1,
                              replay=replay)                            # (B, A, V)
    return gather_log_probs(logits, seq[:, P:])


def reuses_first_forward(args) -> bool:
    """True when the update's first forward sees the very weights that generated the rollout (one epoch, one
    mini-batch per iteration) and computes what an experience pass would (no dropout)."""
    return (args.ppo_epochs == 1 and args.generation_batches == 1
            and args.per_device_training_batch_size >= args.per_device_generation_batch_size * args.n_samples_per_prompt
            and not args.actor_dropout and not args.critic_dropout and not args.separate_experience_passes)


def _mean_dicts(dicts: List[Dict[str, float]]) -> Dict[str, float]:
    keys = {k for d in dicts for k in d}
    return {k: sum(d[k] for d in dicts if k in d) / sum(1 for d in dicts if k in d) for k in keys}

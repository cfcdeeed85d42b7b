"""The four (five) models of PPO as DeepSpeed engines.

    actor  (trained)  <- step-1 model        reference (frozen) <- step-1 model
    critic (trained)  <- step-2 reward model reward    (frozen) <- step-2 reward model, and/or a classifier,
                                                                   a reward function, a reward server
    ema    (optional, EMA of the actor)

The critic exists for --advantage_estimator gae only: the critic-free estimators (GRPO, RLOO, REINFORCE++)
take their baseline from the rewards of several answers, so no value model and no critic optimizer are built.

Memory: when the actor trains only LoRA, the reference IS the actor with its adapters switched off, and
when the critic trains only LoRA (plus its head), the reward model IS the critic's decoder with adapters off
and a frozen copy of the starting head. No second copy of a frozen model is held in those cases.
"""
import contextlib
import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning.remote_reward import RemoteReward
from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning.reward_function import RewardFunction
from alpaca_rlhf.deepspeed_chat.training.utils.errors import ConfigError
from alpaca_rlhf.deepspeed_chat.training.utils.losses import end_scores, last_token_index
from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import create_hf_model
from alpaca_rlhf.deepspeed_chat.training.utils.model.reward_model import create_critic_model
from alpaca_rlhf.deepspeed_chat.training.utils.module.lora import lora_disabled
from alpaca_rlhf.deepspeed_chat.training.utils.train_utils import (EngineSpec, apply_lora, init_engine,
                                                                   init_frozen_engine, shares_base, train_ds_config)
from alpaca_rlhf.deepspeed_chat.training.utils.utils import print_rank_0


class ClassifierReward(nn.Module):
    """Reward = one label's logit of a sequence-classification model (e.g. a sentiment classifier's
    POSITIVE logit, as in TRL's IMDB example). Text is decoded with the policy's tokenizer and re-encoded
    with the classifier's own, so the two tokenizers need not match."""

    def __init__(self, path: str, label: str, policy_tokenizer, trust_remote_code: bool = False):
        super().__init__()
        self.model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        label2id = {str(k): int(v) for k, v in (self.model.config.label2id or {}).items()}
        if label not in label2id:
            raise ConfigError(f"--reward_label {label!r} is not a label of {path} (labels: {', '.join(label2id)})")
        self.label_id = label2id[label]
        self.policy_tokenizer = policy_tokenizer
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, seq: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
        texts = [self.policy_tokenizer.decode(s[m.bool()], skip_special_tokens=True)
                 for s, m in zip(seq, attention_mask)]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(seq.device)
        return self.model(**enc).logits[:, self.label_id].float()


class DeepSpeedRLHFEngine:
    def __init__(self, args, tokenizer, total_steps: int):
        self.args, self.tokenizer = args, tokenizer
        self.actor_spec = EngineSpec.from_args(args, "actor_", "learning_rate")
        self.critic_spec = EngineSpec.from_args(args, "critic_", "learning_rate")
        micro, gas = args.per_device_training_batch_size, args.gradient_accumulation_steps

        # actor and its reference
        actor_config = train_ds_config(self.actor_spec, args, micro, gas, generates=True)
        actor = create_hf_model(AutoModelForCausalLM, args.actor_model_name_or_path, tokenizer, actor_config,
                                args.actor_dropout, args.trust_remote_code, args.dtype)
        apply_lora(actor, self.actor_spec)
        self.ema = self._make_ema(actor) if args.enable_ema else None
        self.actor = init_engine(actor, self.actor_spec, args, actor_config, total_steps)
        if shares_base(self.actor_spec) and not args.reference_model_name_or_path:
            self.ref = None
            print_rank_0("reference policy: the actor with LoRA switched off (shared base weights)")
        else:
            ref = create_hf_model(AutoModelForCausalLM, args.reference_model_name_or_path or args.actor_model_name_or_path,
                                  tokenizer, actor_config, None, args.trust_remote_code, args.dtype)
            self.ref = init_frozen_engine(ref, args, self.actor_spec.zero_stage, args.offload_reference_model)

        # the reward sources (--reward_model_type: a step-2 model, a classifier, a function, a reward server)
        # and the critic (GAE only)
        sources = args.reward_model_type
        self.critic, self.reward_model, self.reward_head = None, None, None
        self.classifier = (ClassifierReward(args.reward_model_name_or_path, args.reward_label, tokenizer,
                                            args.trust_remote_code).to(args.device) if "classifier" in sources else None)
        self.reward_function = RewardFunction(args.reward_function) if "function" in sources else None
        self.remote_reward = (RemoteReward(args.reward_url, args.reward_timeout, args.reward_retries)
                              if "remote" in sources else None)
        print_rank_0("reward: " + " + ".join(f"{w:g} x {s}" for s, w in zip(sources, args.reward_weights)) +
                     (f" ({args.reward_function})" if self.reward_function else "") +
                     (f" (server {args.reward_url}: {self.remote_reward.info.get('model')})" if self.remote_reward
                      else ""))
        critic_config = train_ds_config(self.critic_spec, args, micro, gas)
        if args.advantage_estimator != "gae":
            print_rank_0(f"no critic: --advantage_estimator {args.advantage_estimator} takes its baseline from the "
                         f"rewards (no value model, no critic optimizer)")
            if "reward_model" in sources:
                self.reward_model = self._frozen_reward_model(critic_config)
            return
        critic = create_critic_model(args.critic_model_name_or_path, tokenizer, critic_config,
                                     args.num_padding_at_beginning, args.critic_dropout, args.compute_fp32_loss,
                                     trust_remote_code=args.trust_remote_code, dtype=args.dtype)
        apply_lora(critic, self.critic_spec, force_optimize_params=["v_head"])
        if "reward_model" in sources and shares_base(self.critic_spec) and not args.reward_model_name_or_path:
            # A frozen copy of the starting head (a few KB): the critic's head is trained, the reward's is not.
            # Kept in float32 (the head computes in float32 anyway; DeepSpeed casts only the engines' modules).
            self.reward_head = copy.deepcopy(critic.v_head).requires_grad_(False).float().to(args.device)
            print_rank_0("reward model: the critic's decoder with LoRA switched off + the step-2 head (shared)")
        elif "reward_model" in sources:
            self.reward_model = self._frozen_reward_model(critic_config)
        self.critic = init_engine(critic, self.critic_spec, args, critic_config, total_steps)

    def _frozen_reward_model(self, ds_config):
        """The step-2 reward model as a frozen engine of its own."""
        a = self.args
        reward = create_critic_model(a.reward_model_name_or_path or a.critic_model_name_or_path, self.tokenizer,
                                     ds_config, a.num_padding_at_beginning, None, a.compute_fp32_loss,
                                     trust_remote_code=a.trust_remote_code, dtype=a.dtype)
        return init_frozen_engine(reward, a, self.critic_spec.zero_stage, a.offload_reward_model)

    @property
    def engines(self) -> dict:
        """The trained engines, by name (what a checkpoint holds)."""
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    # ------------------------------------------------------------------------------------------- frozen passes
    def reference_context(self):
        """Inside this block `self.reference_model` computes the reference policy."""
        return lora_disabled(self.actor.module) if self.ref is None else contextlib.nullcontext()

    @property
    def reference_model(self):
        return self.actor.module if self.ref is None else self.ref.module

    @torch.no_grad()
    def reward_scores(self, seq: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                      ended: torch.Tensor) -> torch.Tensor:
        """Each --reward_model_type source's raw score of each sequence, in the flag's order. seq, attention_mask
        (B, L), the answers from column prompt_length on; ended (B,) bool: the answer emitted its EOS. -> (B, S)"""
        texts = None
        if self.reward_function is not None or self.remote_reward is not None:  # the text sources' input
            texts = self.decode(seq, prompt_length)
        columns = []
        for source in self.args.reward_model_type:
            if source == "reward_model":
                columns.append(self._reward_model_scores(seq, attention_mask, prompt_length))
            elif source == "classifier":
                columns.append(self.classifier(seq, attention_mask, prompt_length))
            elif source == "function":
                columns.append(self.reward_function(*texts).to(seq.device))
            else:
                columns.append(self.remote_reward(*texts, ended.tolist()).to(seq.device))
        return torch.stack(columns, dim=1)

    def decode(self, seq: torch.Tensor, prompt_length: int):
        """(prompt texts, answer texts) of sequences (B, L) whose answers start at column prompt_length."""
        return (self.tokenizer.batch_decode(seq[:, :prompt_length], skip_special_tokens=True),
                self.tokenizer.batch_decode(seq[:, prompt_length:], skip_special_tokens=True))

    def _reward_model_scores(self, seq, attention_mask, prompt_length):
        """The step-2 model's end score: its value at each row's last real token. (B, L) -> (B,)"""
        # only each row's last real token is read: the last decoder layer runs from the earliest of them on
        start = int(last_token_index(attention_mask).min())
        if self.reward_model is None:
            critic = self.critic.module
            with lora_disabled(critic):
                hidden = critic.hidden_states(seq, attention_mask, from_position=start)   # (B, L - start, H)
            return end_scores(self.reward_head(hidden), attention_mask, start)
        return self.reward_model.module.forward_value(seq, attention_mask, prompt_length=prompt_length,
                                                      from_position=start)["chosen_end_scores"].float()

    # ------------------------------------------------------------------------------------------- EMA
    def _make_ema(self, actor: nn.Module) -> nn.Module:
        if self.actor_spec.zero_stage == 3:
            raise ConfigError("--enable_ema keeps a full copy of the actor on every rank; it supports "
                              "--actor_zero_stage 0-2 (use stage 2, or export the final actor instead)")
        # float32 on the training device: in bf16/fp16, decay * ema + (1 - decay) * actor with decay 0.992 loses
        # most of each update to rounding (the step is below half an ulp of the weight)
        return copy.deepcopy(actor).requires_grad_(False).eval().float().to(self.args.device)

    def ema_state(self) -> dict:
        """The EMA's tensors for a checkpoint ({} without --enable_ema)."""
        return {} if self.ema is None else {f"ema.{k}": v for k, v in self.ema.state_dict().items()}

    @torch.no_grad()
    def load_ema_state(self, tensors: dict):
        """Restore the EMA from a checkpoint's tensors (a checkpoint without them leaves it as it is)."""
        state = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
        if self.ema is not None and state:
            self.ema.load_state_dict(state)
        elif self.ema is not None:
            print_rank_0("warning: the checkpoint holds no EMA (written without --enable_ema); the EMA starts "
                         "again from the resumed actor")

    @torch.no_grad()
    def update_ema(self, decay: float):
        """ema = decay * ema + (1 - decay) * actor, over every parameter (LoRA included)."""
        if self.ema is None:
            return
        for ema_p, p in zip(self.ema.parameters(), self.actor.module.parameters()):
            ema_p.mul_(decay).add_(p.detach().to(ema_p.device, ema_p.dtype), alpha=1.0 - decay)

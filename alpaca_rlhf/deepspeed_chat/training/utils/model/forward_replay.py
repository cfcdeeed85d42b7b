"""The rollout's own forward, replayed as the actor's first training forward.

Why: with one PPO epoch and one mini-batch (no optimizer step between generation and the update, no dropout)
the actor's first training forward sees the very weights and tokens that generation just pushed through it,
position by position. Generation has therefore already computed every linear map of that forward: the
prompt's in the prefill, each answer token's in its decode step, the LM head's at every position that
predicts an answer token. Recording those outputs (`ForwardRecording`) and returning them in the training
forward (`decoder_forward(..., replay=recording)`, decoder.py) skips the forward's matmuls, about 2N FLOPs per
token and most of the forward's time; the cheap parts (embeddings, RMSNorm, rotary, attention, SiLU) still run, so
autograd builds the same graph and the backward is unchanged. Each replayed linear's backward is the linear's own:
dx = g W, dW = g^T x.

What has to line up:
- Positions. Generation feeds positions 0 .. P + n - 2 (the last sampled token is never fed), so the training
  forward runs on seq[:, :-1]: exactly those positions. After a row's EOS generation fed padding, and so does
  the cut sequence; those positions are masked (no loss, never attended by a real token), so whatever was
  recorded there gets zero gradient.
- Weights. LoRA is fused during generation, so a LoRA layer's record is x (W + sBA)^T: exactly what LoRALinear's
  training forward computes (it folds the update into the weight the same way), so the record is returned with
  that forward's backward (gradients for A and B as the two-branch form gives them).
- Numbers. The logits returned are the generation's own, so pi_old of the update equals the probabilities
  the tokens were sampled from (the first ratio is exactly 1). The recomputed cheap parts match the rollout's
  to float rounding, which only enters the backward (tests/test_forward_replay.py: gradients equal a full
  forward's within rtol 1e-4).

Only where the lean decode step ran (`LlamaDecoder`: plain LLaMA, unpartitioned weights), with a SiLU MLP, no
LoRA dropout and no gradient checkpointing (its recomputation would replay the layers twice). The prompt pass
computes the last layer's queries, o and MLP at the prompt's last position only, so the replayed forward must
start its last layer there too (from_position = P - 1, what the PPO pass reads).
Shapes: B rows, P prompt length, N = max new tokens, T = P + N - 1 recorded positions.
"""
from typing import Optional

import torch
from torch import nn

from ..module.lora import LoRALinear, lora_linear
from .families import LLAMA
from .llama_decoder import GROUPS, LlamaDecoder, group_slices


class _ReplayedLinear(torch.autograd.Function):
    """y = x W^T + b whose value is already known: forward returns `output`, backward is the linear's."""

    @staticmethod
    def forward(ctx, x, weight, bias, output):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return output

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        g2 = grad.reshape(-1, grad.size(-1))                             # (rows, out)
        d_x = (grad @ weight) if need_x else None                        # (..., in)
        d_weight = (g2.t() @ x.reshape(-1, x.size(-1))) if need_weight else None
        d_bias = g2.sum(0) if need_bias and ctx.has_bias else None
        return d_x, d_weight, d_bias, None


def _qualifies(model: nn.Module) -> bool:
    # LLaMA only: the lean step also runs Mistral and Qwen2, but their replayed training forward is not tested
    if not LlamaDecoder.qualifies(model) or LLAMA is None or not isinstance(model, LLAMA.causal_lm):
        return False
    checkpointing = getattr(model, "is_activation_checkpointing", None)   # transformers 5's name
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        return False
    if getattr(model.config, "hidden_act", None) != "silu":
        return False
    # the training forward of a LoRA layer must be the folded one, the value its fused rollout computed
    return all(m.can_fold() for m in model.modules() if isinstance(m, LoRALinear))


class ForwardRecording:
    """Output buffers for every linear map of a LLaMA causal LM over one rollout: per layer and projection
    group of the decode step (qkv, o, gateup, down: the outputs side by side, as the step computes them)
    (B, T, width), and the LM head's (B, N, V) at the positions P - 1 .. P + N - 2 that predict answer tokens."""

    @classmethod
    def for_model(cls, model: nn.Module, rows: int, prompt_length: int, max_new_tokens: int,
                  reuse: Optional[tuple] = None) -> Optional["ForwardRecording"]:
        """A recording for this rollout, or None when the model's training forward cannot be replayed. Call it on
        the model as it is about to generate (LoRA fused: the lean decode step runs only then). `reuse`: the
        `buffers` of an earlier recording whose replay is over, written again when the shapes match."""
        return cls(model, rows, prompt_length, max_new_tokens, reuse) if _qualifies(model) else None

    def __init__(self, model: nn.Module, rows: int, prompt_length: int, max_new_tokens: int,
                 reuse: Optional[tuple] = None):
        self.model = model
        self.prompt_length = prompt_length
        T = prompt_length + max_new_tokens - 1
        p = next(model.parameters())
        self.slices = [group_slices(layer) for layer in model.model.layers]  # projection -> (group, columns)
        shapes = [{group: (rows, T, max(hi for g, _, hi in where.values() if g == group)) for group in GROUPS}
                  for where in self.slices]
        logits_shape = (rows, max_new_tokens, model.lm_head.out_features)
        if reuse is not None and _shapes_of(reuse) == (shapes, logits_shape, p.dtype, p.device):
            # Hundreds of megabytes on larger models: fresh ones each rollout cost the kernel's page faults.
            self.layers, self.logits = [dict(layer) for layer in reuse[0]], reuse[1]
        else:
            self.layers = [{group: torch.empty(shape, dtype=p.dtype, device=p.device) for group, shape in layer.items()}
                           for layer in shapes]
            self.logits = torch.empty(logits_shape, dtype=p.dtype, device=p.device)
        self.buffers = (self.layers, self.logits)  # for `reuse` by the next rollout's recording
        self.complete = False   # set by the sampler when every fed position went through the lean step

    # ----------------------------------------------------------------------------------- recording
    def put(self, layer: int, group: str, position: int, out: torch.Tensor, columns=None):
        """out (B, t, width): the projection group's result (or, with columns=(lo, hi), one projection's share)
        for positions position .. position + t - 1."""
        buffer = self.layers[layer][group]
        if columns is not None:
            buffer = buffer[..., columns[0]:columns[1]]
        buffer[:, position:position + out.size(1)] = out

    def output(self, layer: int, name: str) -> torch.Tensor:
        """The recorded (B, T, out) result of one projection (a view into its group's buffer)."""
        group, lo, hi = self.slices[layer][name]
        return self.layers[layer][group][..., lo:hi]

    def put_logits(self, position: int, logits: torch.Tensor):
        """logits (B, V) of sequence position `position` (>= P - 1), predicting the token after it."""
        self.logits[:, position - self.prompt_length + 1] = logits

    def put_output(self, layer: int, name: str, position: int, out: torch.Tensor):
        """out (B, t, width): one projection's result for positions position .. position + t - 1 (the prompt pass)."""
        group, lo, hi = self.slices[layer][name]
        self.put(layer, group, position, out, (lo, hi))

    # ----------------------------------------------------------------------------------- replaying
    def output_for(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor:
        """The recorded output of one projection at the positions of its input x (B, t, in): all of them, or the
        last t where the layer runs from a position on (decoder_forward's last layer)."""
        recorded = _suffix(self.output(layer, name), x)
        if recorded.shape[:-1] != x.shape[:-1]:
            raise RuntimeError(f"replayed forward: input {tuple(x.shape)} does not match the recorded "
                               f"output {tuple(recorded.shape)}")
        return recorded

    def replay_linear(self, layer: int, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """module(x) for nn.Linear or LoRALinear, returning the recorded output, with the linear's backward."""
        return _replayed(module, x, self.output_for(layer, name, x))

    def replay_logits(self, lm_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head(hidden) for hidden (B, N, H) at positions P - 1 .. P + N - 2: the recorded logits."""
        return _replayed(lm_head, hidden, _suffix(self.logits, hidden))

    def trim(self, fed_positions: int):
        """Keep the first `fed_positions` positions (the rollout ended before max_new_tokens)."""
        n = fed_positions - self.prompt_length + 1
        if fed_positions < self.layers[0]["qkv"].size(1):
            self.layers = [{k: v[:, :fed_positions].contiguous() for k, v in layer.items()} for layer in self.layers]
            self.logits = self.logits[:, :n].contiguous()


def _shapes_of(buffers: tuple):
    layers, logits = buffers
    return ([{g: tuple(t.shape) for g, t in layer.items()} for layer in layers], tuple(logits.shape), logits.dtype,
            logits.device)


def _suffix(recorded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The record (B, T, out) at the positions of an input (B, t, in): all of them, or the last t when the layer
    runs from a position on (decoder_forward gives the last layer's queries and MLP the suffix only)."""
    t = x.size(-2)
    return recorded if t >= recorded.size(-2) else recorded[..., recorded.size(-2) - t:, :]


def _replayed(module: nn.Module, x: torch.Tensor, recorded: torch.Tensor) -> torch.Tensor:
    if isinstance(module, LoRALinear):
        if not module.folds():  # adapters off or unfused forms: the record (fused weights) would not match
            raise RuntimeError("a replayed LoRA layer must run with its adapters on, unfused, without dropout")
        return lora_linear(module, x, output=recorded)  # recorded = x (W + sBA)^T, the folded forward's value
    return _ReplayedLinear.apply(x, module.weight, module.bias, recorded)

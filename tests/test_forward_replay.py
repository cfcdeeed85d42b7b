"""The actor's first training forward replayed from the rollout (utils/model/forward_replay.py) against a full
forward: same logits, same gradients, with left padding, EOS cut-offs, grouped-query attention and LoRA."""
import contextlib

import pytest
import torch
from transformers import LlamaConfig

from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning.ppo_math import cut_at_eos
from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning.ppo_trainer import answer_log_probs
from alpaca_rlhf.deepspeed_chat.training.utils.losses import gather_log_probs
from alpaca_rlhf.deepspeed_chat.training.utils.model.decoder import LEAN_CAUSAL_LM
from alpaca_rlhf.deepspeed_chat.training.utils.model.forward_replay import ForwardRecording
from alpaca_rlhf.deepspeed_chat.training.utils.model.generation import sample
from alpaca_rlhf.deepspeed_chat.training.utils.module.lora import (convert_linear_layer_to_lora, lora_fused,
                                                                   only_optimize_lora_parameters)

PAD, EOS = 0, 2


def _model(lora: bool = False):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LEAN_CAUSAL_LM["llama"](config)
    if lora:
        convert_linear_layer_to_lora(model, "q_proj,v_proj,down_proj", lora_dim=4)
        with torch.no_grad():  # B starts at zero; give the adapters something to add
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
        only_optimize_lora_parameters(model)
    return model.eval()


def _prompts(same_prompt: bool = False):
    torch.manual_seed(1)
    B, P = 4, 10
    ids = torch.randint(3, 96, (B, P))
    mask = torch.ones(B, P, dtype=torch.long)
    for row, pad in enumerate((2, 2, 2, 2) if same_prompt else (0, 3, 1, 6)):  # left padding
        mask[row, :pad] = 0
        ids[row, :pad] = PAD
    if same_prompt:
        ids[:] = ids[0]
    return ids, mask


def _rollout(model, ids, mask, new_tokens, lora, eos=EOS, **sampling):
    with torch.no_grad(), (lora_fused(model) if lora else contextlib.nullcontext()):
        recording = ForwardRecording.for_model(model, ids.size(0), ids.size(1), new_tokens)
        assert recording is not None
        seq, _ = sample(model, ids, mask, new_tokens, eos, PAD, recording=recording, **sampling)
    assert recording.complete
    P = ids.size(1)
    answer, action_mask, ended = cut_at_eos(seq[:, P:], eos, PAD)
    seq = torch.cat([seq[:, :P], answer], 1)
    return seq, torch.cat([mask, action_mask.long()], 1), action_mask, recording


def _policy_forward(model, seq, attention_mask, P, recording=None):
    """The trainer's own policy pass (positions 0 .. L-2, the LM head on P-1 .. L-2): (the LM head's output, None
    when replayed, which runs no LM head; the answer's log-probs)."""
    caught = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: caught.append(out))
    try:
        logp = answer_log_probs(model, seq, attention_mask, P, replay=recording)
    finally:
        hook.remove()
    assert len(caught) == (0 if recording is not None else 1)
    return (caught[0] if caught else None), logp


def _grads_of(model, seq, attention_mask, action_mask, P, recording=None):
    model.zero_grad(set_to_none=True)
    model.train()
    logits, logp = _policy_forward(model, seq, attention_mask, P, recording)
    # a loss over the answer tokens that weights every position differently
    weights = torch.linspace(0.5, 1.5, logp.size(1))
    (-(logp * action_mask * weights).sum() / action_mask.sum()).backward()
    model.eval()
    return logits, logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_replayed_forward_gives_the_rollout_logits_and_the_full_forward_gradients(lora):
    model = _model(lora)
    ids, mask = _prompts()
    P = ids.size(1)
    # EOS := the token row 1 samples sixth, so that at least one answer is cut off and padded after its EOS
    torch.manual_seed(3)
    with torch.no_grad(), (lora_fused(model) if lora else contextlib.nullcontext()):
        free, _ = sample(model, ids, mask, 12, -1, PAD, temperature=1.5, suppress_eos_first=False)
    eos = int(free[1, P + 5])
    torch.manual_seed(3)  # the same draws: the rollout below follows `free` up to each row's EOS
    seq, attention_mask, action_mask, recording = _rollout(model, ids, mask, 12, lora, eos=eos, temperature=1.5,
                                                           suppress_eos_first=False)
    assert not action_mask.all() and action_mask.sum(-1).max() > 6, action_mask
    rollout_logp = gather_log_probs(recording.logits.clone(), seq[:, P:])
    full_logits, full_logp, full_grads = _grads_of(model, seq, attention_mask, action_mask, P)
    _, replay_logp, replay_grads = _grads_of(model, seq, attention_mask, action_mask, P, recording)
    real = action_mask.bool()
    # the replayed log-probs are the rollout's own, bit for bit
    torch.testing.assert_close(replay_logp, rollout_logp, rtol=0, atol=0)
    # ... and equal a full forward's wherever a real token is predicted
    torch.testing.assert_close(replay_logp[real], full_logp[real], rtol=1e-4, atol=1e-4)
    assert full_grads.keys() == replay_grads.keys() and full_grads
    if lora:
        assert all("lora_" in n for n in full_grads)
    for name in full_grads:
        torch.testing.assert_close(replay_grads[name], full_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    # without the recording the same forward computes again
    again, _, _ = _grads_of(model, seq, attention_mask, action_mask, P)
    torch.testing.assert_close(again, full_logits)


def test_a_rollout_that_ends_early_is_replayed_over_the_positions_it_fed():
    """Every row stops at the same EOS before max_new_tokens: the recording is cut to the fed positions."""
    model = _model()
    ids, mask = _prompts(same_prompt=True)
    P = ids.size(1)
    with torch.no_grad():
        free, _ = sample(model, ids, mask, 12, -1, PAD, do_sample=False, suppress_eos_first=False)
    assert (free[:, P:] == free[0, P:]).all(), "rows with the same real tokens should agree"
    eos = int(free[0, P + 3])  # the greedy answer's fourth token ends every row
    seq, attention_mask, action_mask, recording = _rollout(model, ids, mask, 12, False, eos=eos, do_sample=False)
    n = seq.size(1) - P
    assert n < 12 and recording.logits.size(1) == n and recording.layers[0]["qkv"].size(1) == P + n - 1
    _, full_logp, full_grads = _grads_of(model, seq, attention_mask, action_mask, P)
    _, replay_logp, replay_grads = _grads_of(model, seq, attention_mask, action_mask, P, recording)
    torch.testing.assert_close(replay_logp[action_mask.bool()], full_logp[action_mask.bool()], rtol=1e-4, atol=1e-4)
    for name in full_grads:
        torch.testing.assert_close(replay_grads[name], full_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_replayed_forward_checks_its_positions():
    model = _model()
    ids, mask = _prompts()
    seq, attention_mask, action_mask, recording = _rollout(model, ids, mask, 6, False)
    P = ids.size(1)
    with pytest.raises(RuntimeError, match="does not match the recorded"):  # all L positions: one more than was fed
        model(input_ids=seq, attention_mask=attention_mask, from_position=P - 1, replay=recording)
    with pytest.raises(ValueError, match="only that suffix was recorded"):  # the last layer's prefix was not computed
        model(input_ids=seq[:, :-1], attention_mask=attention_mask[:, :-1], replay=recording)


def test_models_that_cannot_be_replayed_get_no_recording():
    model = _model()
    model.gradient_checkpointing_enable()
    assert ForwardRecording.for_model(model, 2, 4, 4) is None
    lora = _model()
    convert_linear_layer_to_lora(lora, "q_proj", lora_dim=4, lora_droppout=0.1)
    with lora_fused(lora):
        assert ForwardRecording.for_model(lora, 2, 4, 4) is None

"""The actor's first training forward replayed from the rollout (utils/model/forward_replay.py) against a full
forward: same logits, same gradients, with left padding, EOS cut-offs, grouped-query attention and LoRA."""
import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning.ppo_math import cut_at_eos
from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning.ppo_trainer import answer_log_probs
from alpaca_rlhf.deepspeed_chat.training.utils.model.forward_replay import (ForwardRecording, is_replaying,
                                                                            replaying)
from alpaca_rlhf.deepspeed_chat.training.utils.model.generation import sample
from alpaca_rlhf.deepspeed_chat.training.utils.model.lean_modules import use_lean_modules
from alpaca_rlhf.deepspeed_chat.training.utils.module.lora import (convert_linear_layer_to_lora, lora_fused,
                                                                   only_optimize_lora_parameters)

PAD, EOS = 0, 2


def _model(lora: bool = False):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    use_lean_modules(model)
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


def _policy_forward(model, seq, attention_mask, P):
    """The trainer's own policy pass (positions 0 .. L-2, the LM head on P-1 .. L-2), with the LM head's
    output (the logits) caught on the way."""
    caught = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: caught.append(out))
    try:
        logp = answer_log_probs(model, seq, attention_mask, P)
    finally:
        hook.remove()
    return caught[0], logp


def _grads_of(model, seq, attention_mask, action_mask, P, recording=None):
    model.zero_grad(set_to_none=True)
    model.train()
    if recording is None:
        logits, logp = _policy_forward(model, seq, attention_mask, P)
    else:
        with replaying(model, recording):
            assert is_replaying(model) and is_replaying(model.model)
            logits, logp = _policy_forward(model, seq, attention_mask, P)
        assert not is_replaying(model)
    # a loss over the answer tokens that weights every position differently
    weights = torch.linspace(0.5, 1.5, logp.size(1))
    (-(logp * action_mask * weights).sum() / action_mask.sum()).backward()
    model.eval()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


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
    recorded_logits = recording.logits.clone()
    full_logits, full_grads = _grads_of(model, seq, attention_mask, action_mask, P)
    replay_logits, replay_grads = _grads_of(model, seq, attention_mask, action_mask, P, recording)
    real = action_mask.bool()
    # the replayed logits are the rollout's own
    torch.testing.assert_close(replay_logits, recorded_logits, rtol=0, atol=0)
    # ... and equal a full forward's wherever a real token is predicted
    torch.testing.assert_close(replay_logits[real], full_logits[real], rtol=1e-4, atol=1e-4)
    assert full_grads.keys() == replay_grads.keys() and full_grads
    if lora:
        assert all("lora_" in n for n in full_grads)
    for name in full_grads:
        torch.testing.assert_close(replay_grads[name], full_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    # the modules are themselves again: a plain forward computes, nothing is replayed
    again, _ = _grads_of(model, seq, attention_mask, action_mask, P)
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
    full_logits, full_grads = _grads_of(model, seq, attention_mask, action_mask, P)
    replay_logits, replay_grads = _grads_of(model, seq, attention_mask, action_mask, P, recording)
    torch.testing.assert_close(replay_logits[action_mask.bool()], full_logits[action_mask.bool()], rtol=1e-4,
                               atol=1e-4)
    for name in full_grads:
        torch.testing.assert_close(replay_grads[name], full_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_recording_is_used_once_and_checks_shapes():
    model = _model()
    ids, mask = _prompts()
    seq, attention_mask, action_mask, recording = _rollout(model, ids, mask, 6, False)
    with pytest.raises(RuntimeError, match="does not match the recorded"):
        with replaying(model, recording):
            model(input_ids=seq, attention_mask=attention_mask)  # all L positions: one more than was fed
    assert recording.layers == [] and recording.logits is None


def test_models_that_cannot_be_replayed_get_no_recording():
    model = _model()
    model.gradient_checkpointing_enable()
    assert ForwardRecording.for_model(model, 2, 4, 4) is None
    lora = _model()
    convert_linear_layer_to_lora(lora, "q_proj", lora_dim=4, lora_droppout=0.1)
    with lora_fused(lora):
        assert ForwardRecording.for_model(lora, 2, 4, 4) is None

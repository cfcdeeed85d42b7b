"""Padding-free packing and the answer-only LM head (utils/data/packing.py, utils/model/token_log_probs.py):
the SFT loss, the pairwise reward loss and the DPO loss of a padded batch computed by the transformers forward
over every position, against the same batch packed into one sequence with the LM head run only where a token is
scored (in chunks, too): the same losses and the same gradients, for LLaMA and Qwen2; GPT-2 (not packed) gives
the transformers numbers as they are."""
import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaModel, Qwen2Config,
                          Qwen2ForCausalLM, Qwen2Model)

from alpaca_rlhf.deepspeed_chat.training.utils.data.packing import pack_pairs, pack_rows, suffix_positions, unpack
from alpaca_rlhf.deepspeed_chat.training.utils.losses import dpo_loss, sequence_log_probs
from alpaca_rlhf.deepspeed_chat.training.utils.model.decoder import LEAN_CAUSAL_LM, decoder_forward
from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import causal_lm_loss
from alpaca_rlhf.deepspeed_chat.training.utils.model.reward_model import RewardModel
from alpaca_rlhf.deepspeed_chat.training.utils.model.token_log_probs import scored_token_log_probs

SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM, LlamaModel), "qwen2": (Qwen2Config, Qwen2ForCausalLM, Qwen2Model)}


def _models(family):
    """(transformers' causal LM, ours) with the same weights, fp32, SDPA."""
    config_class, causal_lm, _ = FAMILIES[family]
    config = config_class(**SIZES, attn_implementation="sdpa")
    torch.manual_seed(0)
    ours = LEAN_CAUSAL_LM[family](config)
    theirs = causal_lm(config)
    theirs.load_state_dict(ours.state_dict())
    return theirs, ours


def _batch(rows=(9, 16, 5, 12), prompts=(4, 6, 2, 7), seed=1):
    """Right-padded rows of these lengths; labels -100 on each row's prompt and on padding (as DataCollatorSFT)."""
    torch.manual_seed(seed)
    T = max(rows)
    ids = torch.randint(3, 96, (len(rows), T))
    mask = (torch.arange(T)[None] < torch.tensor(rows)[:, None]).long()
    labels = torch.where((torch.arange(T)[None] >= torch.tensor(prompts)[:, None]) & mask.bool(), ids, -100)
    return ids, mask, labels


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def _assert_same_grads(want, got):
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_pack_and_unpack_keep_each_row_and_restart_positions():
    ids, mask, _ = _batch(rows=(3, 5, 1), prompts=(1, 2, 0))
    packed = pack_rows(ids, mask)
    assert [(s, e) for s, e, _ in packed.blocks] == [(0, 3), (3, 8), (8, 9)] and packed.input_ids.shape == (1, 9)
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0]]
    assert packed.input_ids[0, 3:8].tolist() == ids[1].tolist()
    assert torch.equal(unpack(packed.input_ids.float(), packed), (ids * mask).float())
    where = packed.source.view(3, 5)
    assert where[1].tolist() == [3, 4, 5, 6, 7] and where[2].tolist() == [8, -1, -1, -1, -1]


def test_a_pair_shares_its_common_prefix():
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 9, 0, 0]])                # chosen, rejected: prefix 5 6
    packed = pack_pairs(ids, (ids > 0).long())
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9]] and packed.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    (start, end, allowed), = packed.blocks
    assert (start, end) == (0, 5) and not allowed[4, 2] and not allowed[4, 3] and allowed[4, 1] and allowed[4, 4]
    assert torch.equal(unpack(packed.input_ids.float(), packed), ids.float())
    computed = suffix_positions(packed.blocks, packed.read_from)
    assert packed.read_from == [2] and computed.tolist() == [2, 3, 4]  # from the first difference
    assert unpack(torch.tensor([7.0, 8.0, 9.0]), packed, positions=computed).tolist() == \
        [[0, 0, 7, 8, 0], [0, 0, 9, 0, 0]]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("packing, chunk", [(True, 0), (True, 5), (False, 0)])
def test_sft_loss_and_gradients_equal_the_padded_full_logits(family, packing, chunk):
    theirs, ours = _models(family)
    ids, mask, labels = _batch()
    reference = causal_lm_loss(theirs(input_ids=ids, attention_mask=mask).logits, labels)
    reference.backward()
    want = _grads(theirs)
    logp = scored_token_log_probs(ours, ids, mask, labels != -100, packing, chunk)       # (B, T)
    loss = -logp.sum() / (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(loss, reference.detach(), atol=1e-6, rtol=1e-6)
    loss.backward()
    _assert_same_grads(want, _grads(ours))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_dpo_sequence_log_probs_and_gradients_equal_the_padded_full_logits(family):
    theirs, ours = _models(family)
    ids, mask, labels = _batch(rows=(9, 16, 11, 14), prompts=(4, 6, 4, 6))  # rows 0/2 and 1/3: two pairs
    scored = (labels != -100).long()
    ref = torch.tensor([-30.0, -40.0, -35.0, -38.0])                      # stand-in reference log-probs

    def loss_of(logps):
        losses, _, _ = dpo_loss(logps[:2], logps[2:], ref[:2], ref[2:], beta=0.1)
        return losses.mean()

    want_logps = sequence_log_probs(theirs(input_ids=ids, attention_mask=mask).logits, ids, scored)
    loss_of(want_logps).backward()
    want = _grads(theirs)
    got_logps = scored_token_log_probs(ours, ids, mask, scored, packing=True, logits_chunk=7).sum(-1)
    torch.testing.assert_close(got_logps, want_logps, atol=1e-5, rtol=1e-6)
    loss_of(got_logps).backward()
    _assert_same_grads(want, _grads(ours))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("loss_type", ["span", "last_token"])
def test_the_pairwise_reward_loss_packed_equals_padded(family, loss_type):
    config_class, _, body = FAMILIES[family]
    torch.manual_seed(0)
    model = RewardModel(body(config_class(**SIZES, attn_implementation="sdpa")), loss_type=loss_type)
    torch.nn.init.normal_(model.v_head.weight, std=0.5)
    # rows [0, 4) chosen, [4, 8) rejected: pairs 0 and 1 share their prompts, pair 2 is one answer twice, pair 3's
    # rejected row is the first 6 tokens of its chosen row (both end inside the part the last layer skips)
    ids, mask, _ = _batch(rows=(9, 16, 7, 10, 11, 14, 7, 6), prompts=(4, 6, 3, 4, 4, 6, 3, 4))
    ids[4, :4], ids[5, :6], ids[6], ids[7, :6] = ids[0, :4], ids[1, :6], ids[2], ids[3, :6]
    pack = pack_pairs(ids, mask)
    starts = [a for a, _, _ in pack.blocks]
    assert [f - a for f, a in zip(pack.read_from, starts)] == [4, 6, 6, 5]  # first difference, or a last token
    padded = model(ids, mask, packing=False)
    padded["loss"].backward()
    want = _grads(model)
    packed = model(ids, mask, packing=True)
    for key in ("loss", "chosen_mean_scores", "rejected_mean_scores"):
        torch.testing.assert_close(packed[key], padded[key], atol=1e-5, rtol=1e-5)
    packed["loss"].backward()
    _assert_same_grads(want, _grads(model))


def test_the_last_layer_from_given_positions_gives_those_positions_outputs():
    _, ours = _models("llama")
    ids, mask, _ = _batch(rows=(9, 16, 5), prompts=(4, 6, 2))
    packed = pack_rows(ids, mask)
    full = decoder_forward(ours.model, packed.input_ids, None, packed.position_ids, segments=packed.blocks)
    first = [a + k for (a, _, _), k in zip(packed.blocks, (3, 0, 4))]     # a suffix of each row; the third: 1 position
    part = decoder_forward(ours.model, packed.input_ids, None, packed.position_ids, segments=packed.blocks,
                           last_layer_from=first)
    wanted = torch.cat([torch.arange(f, b) for f, (_, b, _) in zip(first, packed.blocks)])
    assert part.shape == (1, wanted.numel(), full.size(-1))
    torch.testing.assert_close(part, full[:, wanted], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="tile"):
        decoder_forward(ours.model, packed.input_ids, None, packed.position_ids, segments=packed.blocks[1:])


def test_a_family_our_decoder_does_not_run_takes_the_full_logits():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)).eval()  # (no dropout)
    ids, mask, labels = _batch()
    got = scored_token_log_probs(model, ids, mask, labels != -100, packing=True, logits_chunk=4)
    want = sequence_log_probs(model(input_ids=ids, attention_mask=mask).logits, ids, (labels != -100).long())
    torch.testing.assert_close(got.sum(-1), want)

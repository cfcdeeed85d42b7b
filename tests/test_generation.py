"""Rollout sampling (utils/model/generation.py) against transformers' own generate and plain filtering."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from alpaca_rlhf.deepspeed_chat.training.utils.model.generation import filter_logits, sample, sample_from_logits


def left_padded(tokenizer, texts):
    rows = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_greedy_rollouts_equal_hf_generate(micro_model_dir, tokenizer):
    """KV cache, left padding, position ids, EOS banned first and padding after EOS, as HF generate does them."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir).eval()
    ids, mask = left_padded(tokenizer, ["\n\nHuman: What is 3 plus 4?\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant:"])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ours, nonfinite = sample(model, ids, mask, 12, eos, pad, do_sample=False, suppress_eos_first=True)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, begin_suppress_tokens=[eos],
                         eos_token_id=eos, pad_token_id=pad)
    assert not nonfinite
    assert ours.shape == ref.shape and torch.equal(ours, ref)


def test_ignoring_eos_gives_fixed_length_answers(micro_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir).eval()
    ids, mask = left_padded(tokenizer, ["\n\nHuman: Hi\n\nAssistant:"] * 3)
    torch.manual_seed(0)
    seq, _ = sample(model, ids, mask, 20, -1, tokenizer.pad_token_id, temperature=3.0, suppress_eos_first=False)
    assert seq.shape == (3, ids.size(1) + 20)


def test_filter_logits_top_k_and_top_p_against_plain_sorting():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    kept = lambda out: [i for i, v in enumerate(out[0].tolist()) if v != float("-inf")]
    assert kept(filter_logits(logits, top_k=2)) == [0, 4]
    probs = torch.softmax(logits, -1)[0].tolist()  # sorted: 4 (0.61), 0 (0.22), 1 (0.08), 2 (0.05), 3 (0.01)
    order = sorted(range(5), key=lambda i: -probs[i])
    for top_p in (0.5, 0.7, 0.9, 0.99):
        expected, total = [], 0.0
        for i in order:  # keep tokens until the ones before reach top_p
            if total >= top_p:
                break
            expected.append(i)
            total += probs[i]
        assert kept(filter_logits(logits, top_p=top_p)) == sorted(expected), top_p
    assert kept(filter_logits(logits)) == [0, 1, 2, 3, 4]


def _gqa_llama(family="llama", **extra):
    """A 2-layer grouped-query model of a LLaMA-like family (Qwen2: q/k/v biases, here made non-zero)."""
    import transformers
    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    torch.manual_seed(0)
    config = config_class(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **extra)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.5)
    return model


LLAMA_LIKE = [("llama", {}), ("mistral", {"sliding_window": None}), ("qwen2", {})]


@pytest.mark.parametrize("family,extra", LLAMA_LIKE)
def test_lean_decoder_samples_the_same_tokens_as_the_transformers_forward(family, extra):
    """Same seed, same draws: the lean step's logits match the model's forward closely enough that sampling from
    them picks the same tokens (grouped-query attention, left padding, rows finishing at different steps), for
    each LLaMA-like family."""
    from alpaca_rlhf.deepspeed_chat.training.utils.model.llama_decoder import LlamaDecoder
    model = _gqa_llama(family, **extra)
    assert LlamaDecoder.qualifies(model, 34)
    ids = torch.randint(3, 300, (4, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 0)
    runs = []
    for lean in (True, False):
        torch.manual_seed(1)
        runs.append(sample(model, ids, mask, 24, eos_token_id=5, pad_token_id=0, temperature=2.0, lean_decode=lean)[0])
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("family,extra", LLAMA_LIKE)
@pytest.mark.parametrize("relayout", [True, False])
def test_lean_decoder_step_logits_equal_a_full_forward(relayout, family, extra):
    """relayout False is the GPU layout (each weight used where it is stored, no stacked or transposed copies),
    checked here on the CPU."""
    from alpaca_rlhf.deepspeed_chat.training.utils.model.decoder import prefill
    from alpaca_rlhf.deepspeed_chat.training.utils.model.llama_decoder import LlamaDecoder
    model = _gqa_llama(family, **extra)
    ids = torch.randint(3, 300, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits       # (B, 12, V)
        prefix_logits, keys_values = prefill(model, ids[:, :8], mask[:, :8], pos[:, :8])
        torch.testing.assert_close(prefix_logits, full[:, 7], rtol=1e-4, atol=1e-5)
        decoder = LlamaDecoder(model, 3, relayout=relayout)
        decoder.load_prefill(keys_values, 4)
        projections = decoder.projections[0]["qkv"].projections if not relayout else [decoder.projections[0]["qkv"]]
        assert all((p.packed is None and p.transposed is None) != relayout for p in projections)
        for t in range(8, 12):  # feed the true tokens one at a time
            logits = decoder.step(ids[:, t], pos[:, t:t + 1], mask[:, :t + 1].bool())
            torch.testing.assert_close(logits, full[:, t], rtol=1e-4, atol=1e-5)


def test_decode_projection_equals_linear_in_either_layout():
    """fp32 CPU weights go through MKL's packed format where torch has it, others through a transposed copy;
    both must compute F.linear, bias included, for the row count they were laid out for and for fewer rows."""
    from alpaca_rlhf.deepspeed_chat.training.utils.model.llama_decoder import _Projection
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        weight, bias = torch.randn(24, 16, dtype=dtype), torch.randn(24, dtype=dtype)
        for b in (bias, None):
            projection = _Projection(weight, b, rows=4, relayout=True)
            assert (projection.packed is None) == (dtype != torch.float32 or not torch.backends.mkl.is_available())
            for rows in (4, 2):
                x = torch.randn(rows, 1, 16, dtype=dtype)
                torch.testing.assert_close(projection(x), F.linear(x, weight, b))


def test_lean_decoder_leaves_sliding_windows_shorter_than_the_rollout_to_transformers():
    from alpaca_rlhf.deepspeed_chat.training.utils.model.llama_decoder import LlamaDecoder
    model = _gqa_llama("mistral", sliding_window=32)
    assert LlamaDecoder.qualifies(model, 32) and not LlamaDecoder.qualifies(model, 33)
    assert not LlamaDecoder.qualifies(model)  # length unknown
    windowed = _gqa_llama("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0)
    assert not LlamaDecoder.qualifies(windowed, 40) and LlamaDecoder.qualifies(_gqa_llama("qwen2"))


def test_lean_decoder_only_takes_plain_llama_weights():
    from alpaca_rlhf.deepspeed_chat.training.utils.model.llama_decoder import LlamaDecoder
    from alpaca_rlhf.deepspeed_chat.training.utils.module.lora import (convert_linear_layer_to_lora, fuse_lora,
                                                                       unfuse_lora)
    model = _gqa_llama()
    assert LlamaDecoder.for_model(model, 2) is not None
    convert_linear_layer_to_lora(model, "q_proj", lora_dim=4)
    assert LlamaDecoder.for_model(model, 2) is None  # the adapters would be skipped
    fuse_lora(model)
    assert LlamaDecoder.for_model(model, 2) is not None
    unfuse_lora(model)
    assert LlamaDecoder.for_model(model.model, 2) is None  # a bare LlamaModel has no LM head


def test_inverse_cdf_sampling_matches_the_softmax_and_never_draws_filtered_tokens():
    torch.manual_seed(0)
    logits = torch.tensor([[float("-inf"), 1.0, 0.0, float("-inf"), 2.0, -1.0, float("-inf")]]).repeat(40000, 1)
    draws = sample_from_logits(logits)
    counts = torch.bincount(draws, minlength=7).double() / draws.numel()
    expected = torch.softmax(logits[0].double(), -1)
    assert counts[[0, 3, 6]].sum() == 0  # -inf: probability 0, never drawn (the last one included)
    assert torch.allclose(counts, expected, atol=0.01), (counts, expected)


def test_inverse_cdf_sampling_when_the_uniform_draw_reaches_the_total(monkeypatch):
    """u = 1 * total (what rounding can give): the search runs past the end; the last drawable token is taken,
    never a filtered one or an index out of range."""
    logits = torch.tensor([[0.0, 1.0, float("-inf")], [0.0, 1.0, 2.0]])
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape, **kw))
    assert sample_from_logits(logits).tolist() == [1, 2]


def test_lean_decoder_applies_fused_lora_like_the_adapters():
    """With LoRA fused (as during rollouts) the lean step must give what the unfused adapters give."""
    from alpaca_rlhf.deepspeed_chat.training.utils.model.llama_decoder import LlamaDecoder
    from alpaca_rlhf.deepspeed_chat.training.utils.module.lora import (convert_linear_layer_to_lora, lora_fused,
                                                                       lora_modules)
    model = _gqa_llama()
    convert_linear_layer_to_lora(model, "layers.", lora_dim=4)
    for m in lora_modules(model):
        torch.nn.init.normal_(m.lora_B, std=0.2)  # a trained-looking update (B starts at zero)
    ids = torch.randint(3, 300, (2, 9))
    torch.manual_seed(3)
    unfused, _ = sample(model, ids, torch.ones_like(ids), 10, eos_token_id=5, pad_token_id=0, lean_decode=False)
    with lora_fused(model):
        assert LlamaDecoder.for_model(model, 2) is not None  # the lean path is the one under test
        torch.manual_seed(3)
        fused, _ = sample(model, ids, torch.ones_like(ids), 10, eos_token_id=5, pad_token_id=0, lean_decode=True)
    assert torch.equal(fused, unfused)


def test_a_row_with_nonfinite_logits_is_flagged_and_the_other_rows_draw_as_before():
    """NaN logits in one row (from the third step on): the sampler reports it, that row goes on with uniform draws
    over the vocabulary, and the healthy rows draw exactly the tokens they draw without it (one uniform number
    per row, so their draws do not depend on the bad row)."""
    model = _gqa_llama()
    ids = torch.randint(3, 300, (3, 6))
    calls = []

    def poison_row_1(module, args, out):
        calls.append(1)
        if len(calls) >= 3:
            out = out.clone()
            out[1] = float("nan")
        return out

    runs = []
    for poisoned in (False, True):
        handle = model.lm_head.register_forward_hook(poison_row_1) if poisoned else None
        torch.manual_seed(5)
        runs.append(sample(model, ids, torch.ones_like(ids), 8, eos_token_id=-1, pad_token_id=0, lean_decode=False))
        if handle is not None:
            handle.remove()
    (clean, clean_flag), (dirty, dirty_flag) = runs
    assert not clean_flag and dirty_flag
    assert torch.equal(dirty[[0, 2]], clean[[0, 2]])
    assert torch.equal(dirty[1, :8], clean[1, :8])            # the prompt and the two steps before the NaNs
    assert ((dirty[1, 8:] >= 0) & (dirty[1, 8:] < 300)).all()  # uniform draws from the vocabulary afterwards


def test_signed_sin_roll_is_rotate_half_bit_for_bit():
    from transformers.models.llama.modeling_llama import rotate_half

    from alpaca_rlhf.deepspeed_chat.training.utils.model.llama_decoder import _signed_sin
    torch.manual_seed(0)
    x, sin = torch.randn(3, 5, 1, 16), torch.randn(3, 1, 1, 16)
    assert torch.equal(x.roll(8, -1) * _signed_sin(sin), rotate_half(x) * sin)


def test_lean_decoder_rotary_table_equals_the_rotary_module_per_step():
    """The cos/sin table built once per rollout gives the same logits, bit for bit, as the model's rotary module
    called in every step (the path kept for length-dependent rotary types)."""
    from alpaca_rlhf.deepspeed_chat.training.utils.model.decoder import prefill
    from alpaca_rlhf.deepspeed_chat.training.utils.model.llama_decoder import LlamaDecoder
    model = _gqa_llama()
    ids = torch.randint(3, 300, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = []
    with torch.no_grad():
        for table in (True, False):
            _, keys_values = prefill(model, ids[:, :5], mask[:, :5], pos[:, :5])
            decoder = LlamaDecoder.for_model(model, 2)
            decoder.load_prefill(keys_values, 4)
            assert decoder.rope is not None
            if not table:
                decoder.rope = None
            logits.append(torch.stack([decoder.step(ids[:, t], pos[:, t:t + 1], mask[:, :t + 1].bool())
                                       for t in range(5, 9)]))
    assert torch.equal(logits[0], logits[1])


def test_lean_decoder_keeps_the_rotary_module_for_length_dependent_rotary():
    """Dynamic NTK rotary changes its frequencies as the sequence grows past max_position_embeddings: no table, and
    the step follows the transformers forward with its cache (which also keeps the keys as they were rotated)
    while the positions run past that length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from alpaca_rlhf.deepspeed_chat.training.utils.model.decoder import prefill
    from alpaca_rlhf.deepspeed_chat.training.utils.model.llama_decoder import LlamaDecoder
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 300, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        cache = model(input_ids=ids[:, :6], position_ids=pos[:, :6], use_cache=True).past_key_values
        decoder = LlamaDecoder.for_model(model, 2)
        decoder.load_prefill(prefill(model, ids[:, :6], torch.ones(2, 6, dtype=torch.long), pos[:, :6])[1], 6)
        assert decoder.rope is None
        for t in range(6, 12):
            logits = decoder.step(ids[:, t], pos[:, t:t + 1], torch.ones(2, t + 1, dtype=torch.bool))
            out = model(input_ids=ids[:, t:t + 1], position_ids=pos[:, t:t + 1], past_key_values=cache,
                        use_cache=True)
            cache = out.past_key_values
            torch.testing.assert_close(logits, out.logits[:, -1], rtol=1e-4, atol=1e-5)

"""PEFT-layout export of our LoRA adapters: `peft.PeftModel.from_pretrained(base, adapter_dir)` must compute what
our LoRA model computes (and what the merged export computes), for a causal LM, GPT-2's Conv1D layers and the
reward model exported as *ForSequenceClassification. Offline, in-process, a few seconds."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alpaca_rlhf.deepspeed_chat.training.utils.errors import ConfigError
from alpaca_rlhf.deepspeed_chat.training.utils.losses import end_scores, position_ids_from_mask
from alpaca_rlhf.deepspeed_chat.training.utils.model.peft_export import peft_adapter_files, write_peft_adapter
from alpaca_rlhf.deepspeed_chat.training.utils.model.reward_model import create_critic_model
from alpaca_rlhf.deepspeed_chat.training.utils.module.lora import (
    LoRALinear, convert_linear_layer_to_lora, merge_lora_state_dict)

from test_lora import randomize_lora  # B starts at zero (a no-op adapter): give it values

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 9, 13, 2, 7, 30, 41], [1, 17, 4, 8, 0, 0, 0, 0]])   # row 2 right-padded (pad id 0)
MASK = (torch.arange(IDS.size(1)) < torch.tensor([[8], [4]])).long()


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def export_adapter(model, base_dir, task_type, out):
    config, tensors = peft_adapter_files(state_of(model), model, base_dir, task_type)
    write_peft_adapter(out, config, tensors)
    return config, tensors


def saved_keys(directory):
    with safe_open(os.path.join(directory, "adapter_model.safetensors"), framework="pt") as f:
        return set(f.keys())


def check_resave(peft_model, adapter_dir, tmp_path):
    """peft saving the loaded adapter again writes the same keys and values: our layout is peft's own."""
    again = str(tmp_path / "resaved")
    peft_model.save_pretrained(again)
    assert saved_keys(again) == saved_keys(adapter_dir)
    with safe_open(os.path.join(again, "adapter_model.safetensors"), framework="pt") as a, \
            safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="pt") as b:
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def causal_lm_roundtrip(model, base_dir, tmp_path, ids, target):
    """Our LoRA model vs peft (base + adapter) vs the merged model; returns the adapter config."""
    randomize_lora(model)
    model.eval()
    with torch.no_grad():
        ours = model(ids).logits
    state = state_of(model)
    config, _ = export_adapter(model, base_dir, "CAUSAL_LM", str(tmp_path / "adapter"))

    merged = AutoModelForCausalLM.from_pretrained(base_dir)
    merged.load_state_dict(merge_lora_state_dict(state, model))
    merged.save_pretrained(str(tmp_path / "merged"))

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()(ids).logits
    assert not torch.allclose(base_logits, ours, atol=1e-3)   # the adapter changes the model
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_logits, ours, atol=1e-5, rtol=0)
    n_layers = model.config.num_hidden_layers
    assert len([k for k in saved_keys(str(tmp_path / "adapter")) if f".{target}.lora_" in k]) == 2 * n_layers
    check_resave(peft_model, str(tmp_path / "adapter"), tmp_path)
    return config


def test_causal_lm_adapter_loads_in_peft(micro_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    convert_linear_layer_to_lora(model, "q_proj,k_proj", lora_dim=8, lora_scaling=2.0)
    config = causal_lm_roundtrip(model, micro_model_dir, tmp_path, IDS[:1], "q_proj")

    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 8 and config["lora_alpha"] == 2          # peft scaling alpha / r == ours 2.0 / 8
    assert config["target_modules"] == ["k_proj", "q_proj"]
    assert config["fan_in_fan_out"] is False and config["modules_to_save"] is None
    assert config["base_model_name_or_path"] == micro_model_dir
    on_disk = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert on_disk == config
    assert {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"} <= saved_keys(str(tmp_path / "adapter"))


def test_no_lora_gives_none(micro_model_dir):
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    assert peft_adapter_files(state_of(model), model, micro_model_dir, "CAUSAL_LM") is None


def test_gpt2_conv1d_adapter_loads_in_peft(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    base_dir = str(tmp_path / "gpt2")
    GPT2LMHeadModel(config).save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    try:
        convert_linear_layer_to_lora(model, "c_attn", lora_dim=8)
    except ConfigError as e:
        pytest.skip(f"lora.py does not wrap GPT-2's Conv1D layers yet: {e}")
    if not any(getattr(m, "fan_in_fan_out", False) for m in model.modules() if isinstance(m, LoRALinear)):
        pytest.skip("lora.py wrapped c_attn without marking it fan_in_fan_out (Conv1D support incomplete)")
    adapter_config = causal_lm_roundtrip(model, base_dir, tmp_path, IDS[:1], "c_attn")
    assert adapter_config["fan_in_fan_out"] is True and adapter_config["target_modules"] == ["c_attn"]
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        a = f.get_tensor("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight")
        b = f.get_tensor("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight")
    assert a.shape == (8, 64) and b.shape == (192, 8)


def test_reward_model_adapter_loads_in_peft(micro_model_dir, tmp_path):
    rm = create_critic_model(micro_model_dir)
    convert_linear_layer_to_lora(rm, "q_proj,k_proj", lora_dim=8)
    randomize_lora(rm)
    with torch.no_grad():
        rm.v_head.weight.copy_(torch.randn(rm.v_head.weight.shape, generator=torch.Generator().manual_seed(2)))
    rm.eval()
    with torch.no_grad():
        ours = rm.forward_value(IDS, MASK)
    state = state_of(rm)
    adapter = str(tmp_path / "adapter")
    config, tensors = export_adapter(rm, micro_model_dir, "SEQ_CLS", adapter)
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    keys = saved_keys(adapter)
    assert "base_model.model.score.weight" in keys                         # modules_to_save: plain name
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert not any("rwtransformer" in k or "v_head" in k for k in keys)

    # The merged export (as save_hf_format writes it) for comparison.
    hf_config, merged = rm.hf_export(merge_lora_state_dict(state, rm))
    merged_model = AutoModelForSequenceClassification.from_config(hf_config)
    merged_model.load_state_dict(merged)
    merged_model.save_pretrained(str(tmp_path / "merged"))

    base = AutoModelForSequenceClassification.from_pretrained(micro_model_dir, num_labels=1)
    peft_model = peft.PeftModel.from_pretrained(base, adapter).eval()
    merged_model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    for hf in (peft_model.base_model.model, merged_model):
        with torch.no_grad():
            # Per-token scores (the critic's values), with the positions our model uses.
            hidden = hf.model(input_ids=IDS, attention_mask=MASK, position_ids=position_ids_from_mask(MASK))[0]
            values = hf.score(hidden).squeeze(-1)
            # The classifier's own output: the score at the last non-pad token (pad id 0), i.e. the reward.
            pooled = hf(input_ids=IDS, attention_mask=MASK).logits.squeeze(-1)
        # (at the real tokens: a padding position's output is never read, and each forward fills it its own way)
        torch.testing.assert_close(values[MASK.bool()], ours["values"][MASK.bool()], atol=1e-5, rtol=0)
        torch.testing.assert_close(pooled, ours["chosen_end_scores"], atol=1e-5, rtol=0)
        torch.testing.assert_close(pooled, end_scores(values, MASK), atol=1e-5, rtol=0)
    check_resave(peft_model, adapter, tmp_path)

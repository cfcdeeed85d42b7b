"""Export of our hand-written LoRA adapters in the layout of Hugging Face `peft` (LoRA), so that

    PeftModel.from_pretrained(AutoModelFor...from_pretrained(base_dir), adapter_dir)

rebuilds the trained model from the untouched base model plus a small adapter directory:
`adapter_config.json` and `adapter_model.safetensors`. peft itself is not needed to write it.

Key layout (what peft 0.21's `save_pretrained` writes and `PeftModel.from_pretrained` reads):
    base_model.model.<module path>.lora_A.weight    (r, in)
    base_model.model.<module path>.lora_B.weight    (out, r)
    base_model.model.<head>.weight                  extra trained modules (`modules_to_save`), saved under
                                                    their plain name (peft strips `modules_to_save.default.`)
<module path> is the module's name inside the model that `from_pretrained` of the base directory builds:
our own name for a causal LM, the `hf_export` name for the reward model (`rwtransformer.` -> `model.`,
`v_head` -> `score`, task type SEQ_CLS).

The adapter reproduces the trained model only where nothing but the LoRA matrices (and the exported head)
was trained: other weights come from the base directory. Our update is scaling * B A with
scaling = lora_scaling / r, peft's is lora_alpha / r * B A, so lora_alpha = scaling * r. Both keep A as
(r, in) and B as (out, r) for nn.Linear and for GPT-2's Conv1D alike (peft transposes the product itself when
`fan_in_fan_out` is set).
"""
import json
import os
from collections import Counter
from typing import Optional, Tuple

from torch import nn

from ..module.lora import LoRALinear, is_lora_parameter

PREFIX = "base_model.model."


def _number(x: float):
    """1.0 -> 1 (peft writes lora_alpha as an int), anything else unchanged."""
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


def _dropout_p(m: LoRALinear) -> float:
    return float(getattr(m.lora_dropout, "p", 0.0))


def trained_heads(module: nn.Module) -> set:
    """The top-level children of a reward model (one that exports through `hf_export`) without LoRA: its value
    head, trained next to the adapters and saved with them (`modules_to_save`). A causal LM has none."""
    if not hasattr(module, "hf_export"):
        return set()
    return {name for name, child in module.named_children()
            if not any(isinstance(m, LoRALinear) for m in child.modules())}


def adapter_reproduces(module: nn.Module) -> bool:
    """Whether base + adapter gives `module` back: it has LoRA and nothing else was trained but the LoRA matrices
    and a reward model's head."""
    heads = trained_heads(module)
    return any(isinstance(m, LoRALinear) for m in module.modules()) and not any(
        p.requires_grad for name, p in module.named_parameters()
        if not is_lora_parameter(name) and name.split(".", 1)[0] not in heads)


def peft_adapter_files(state: dict, module: nn.Module, base_model_name_or_path: str,
                       task_type: str) -> Optional[Tuple[dict, dict]]:
    """(adapter_config, adapter tensors) in peft's LoRA layout for the full (unmerged) state dict `state` of
    `module` (keys such as `model.layers.0.self_attn.q_proj.lora_A`), or None when `module` has no LoRA.
    `task_type`: "CAUSAL_LM" or "SEQ_CLS" (the reward model / critic). Tensors keep the state's dtype."""
    loras = {name: m for name, m in module.named_modules() if isinstance(m, LoRALinear)}
    if not loras:
        return None
    # Our names -> the names in the exported architecture: hf_export (the reward model) renames the keys of a
    # state dict as the merged export does and keeps only what that checkpoint has (decoder and head).
    export = module.hf_export if hasattr(module, "hf_export") else None
    rename = (lambda d: export(d)[1]) if export else (lambda d: d)
    tensors, shapes = {}, {}
    for name, m in loras.items():
        path = next(iter(rename({f"{name}.lora_A": None})))[:-len(".lora_A")]
        for ab in "AB":
            tensors[f"{PREFIX}{path}.lora_{ab}.weight"] = state[f"{name}.lora_{ab}"]
        shapes[path] = (m.lora_dim, _number(m.scaling * m.lora_dim))
    # Top-level children without LoRA (the reward model's value head) are trained too: peft keeps them as
    # `modules_to_save`, stored under their plain exported name.
    heads = trained_heads(module)
    head = rename({k: v for k, v in state.items() if k.split(".", 1)[0] in heads}) if heads else {}
    tensors.update({PREFIX + k: v for k, v in head.items()})
    # One r / lora_alpha for all layers (the common case); any layer that differs goes into peft's patterns.
    r, alpha = Counter(shapes.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {p: s[0] for p, s in shapes.items() if s[0] != r},
        "alpha_pattern": {p: s[1] for p, s in shapes.items() if s[1] != alpha},
        "lora_dropout": max(_dropout_p(m) for m in loras.values()),
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in loras}),
        # Conv1D (GPT-2) stores its weight (in, out); peft then transposes B A when merging / applying.
        "fan_in_fan_out": any(getattr(m, "fan_in_fan_out", False) for m in loras.values()),
        "bias": "none",
        "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in head}) or None,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }
    return config, tensors


def write_peft_adapter(directory: str, config: dict, tensors: dict):
    """Write `adapter_config.json` and `adapter_model.safetensors` into `directory`."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()},
              os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})

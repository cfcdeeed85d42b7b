"""Loading tokenizers and models, and exporting trained models in Hugging Face format (safetensors)."""
import copy
import math
import os
from typing import Optional

import torch
from torch import nn
from huggingface_hub import save_torch_state_dict
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..errors import UserError
from ..module.lora import merge_lora_state_dict
from ..export_swap import new_export_dir, swap_into_place
from ..utils import is_rank_0, write_json
from .decoder import LEAN_CAUSAL_LM
from .peft_export import adapter_reproduces, peft_adapter_files, write_peft_adapter

LLAMA_PAD_ID = 0  # LLaMA has no pad token; the forks pad with id 0 (unk), which attention masks hide


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_model_path(name_or_path: str, what: str = "model"):
    """A local path that does not exist is a one-line error. A hub-style name (`org/model` or `gpt2`, no such
    local directory) goes on to from_pretrained, which looks it up in the hub cache or the hub (hub_or_local)."""
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise UserError(f"{what} directory {name_or_path} does not exist")


def hub_or_local(load, name_or_path: str, *args, **kwargs):
    """`load(name_or_path, ...)` (a from_pretrained), turning transformers' multi-line "cannot find it" into one
    line that names what was asked for (offline, a hub name that is not in the cache ends here)."""
    try:
        return load(name_or_path, *args, **kwargs)
    except OSError as e:
        reason = " ".join(str(e).split())
        raise UserError(f"cannot load {name_or_path!r} (not a local directory; from the hub cache or the hub): "
                        f"{reason}") from e


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, add_eot_token: bool = False,
                   eot_token: str = "<|endoftext|>"):
    """AutoTokenizer with LLaMA's conventions filled in: a pad token (id 0) when there is none, right padding
    for training (generation code pads prompts on the left itself)."""
    check_model_path(name_or_path, "tokenizer")
    tokenizer = hub_or_local(AutoTokenizer.from_pretrained, name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token_id == LLAMA_PAD_ID:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.pad_token = tokenizer.eos_token
    if add_eot_token:
        tokenizer.add_special_tokens({"additional_special_tokens": [eot_token]})
    tokenizer.padding_side = "right"
    return tokenizer


def tokenizer_from_args(args, model_name_or_path: str):
    """The tokenizer named by --tokenizer_name_or_path, else the model's own, with the shared tokenizer flags."""
    return load_tokenizer(args.tokenizer_name_or_path or model_name_or_path, args.trust_remote_code,
                          args.add_eot_token, args.eot_token)


def set_dropout(config, dropout: Optional[float]):
    """Set every dropout probability the config knows about (None keeps the config's own)."""
    if dropout is None:
        return config
    for key in ("dropout", "attention_dropout", "hidden_dropout", "activation_dropout", "resid_pdrop",
                "embd_pdrop", "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hasattr(config, key):
            setattr(config, key, dropout)
    return config


def create_hf_model(model_class, model_name_or_path: str, tokenizer=None, ds_config: Optional[dict] = None,
                    dropout: Optional[float] = None, trust_remote_code: bool = False, dtype: Optional[str] = None,
                    **kwargs):
    """Load a pretrained model with `model_class` (e.g. AutoModelForCausalLM), ZeRO-3 aware.

    Under ZeRO-3 the weights are partitioned while loading (HfDeepSpeedConfig must be alive during
    from_pretrained), so a model larger than one device's memory can be loaded. `dtype` (fp32|bf16|fp16, the
    resolved --dtype) is the dtype the weights are loaded in, whatever the checkpoint stores: an fp16 checkpoint
    trained with --dtype fp32 trains in fp32, not in fp16 without loss scaling. None keeps transformers' default
    (fp32).
    """
    check_model_path(model_name_or_path)
    if dtype is not None:
        kwargs["dtype"] = TORCH_DTYPES[dtype]
    config = hub_or_local(AutoConfig.from_pretrained, model_name_or_path, trust_remote_code=trust_remote_code)
    set_dropout(config, dropout)
    dschf = None
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig
        dschf = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must stay referenced while loading
    model_class = _lean_class_for(model_class, config, trust_remote_code)
    model = model_class.from_pretrained(model_name_or_path, config=config, trust_remote_code=trust_remote_code,
                                        **kwargs)
    del dschf
    if tokenizer is not None:
        resize_embeddings_for(model, tokenizer)
    return model


def _lean_class_for(model_class, config, trust_remote_code: bool):
    """The class to load a causal LM with: for the LLaMA-like families, the transformers class with our training
    forward (decoder.py's LeanCausalLM: the same weights and files, fewer activations kept, the PPO passes' extras);
    anything else as asked."""
    if model_class is not AutoModelForCausalLM or (trust_remote_code and getattr(config, "auto_map", None)):
        return model_class
    return LEAN_CAUSAL_LM.get(config.model_type, model_class)


def causal_lm_loader(args, tokenizer, path: Optional[str] = None):
    """`load(ds_config)` for prepare_model: the causal LM at `path` (default --model_name_or_path)."""
    return lambda ds_config: create_hf_model(AutoModelForCausalLM, path or args.model_name_or_path, tokenizer,
                                             ds_config, args.dropout, args.trust_remote_code, args.dtype)


def resize_embeddings_for(model, tokenizer):
    """Grow the embeddings when the tokenizer has more tokens than the model (added EOT token), to a
    multiple of 8 for efficient matmuls. Never shrinks: models are often padded beyond the tokenizer."""
    weight = model.get_input_embeddings().weight
    vocab = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 partitions: ds_shape is the full shape
    if len(tokenizer) > vocab:
        model.resize_token_embeddings(int(8 * math.ceil(len(tokenizer) / 8.0)))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id


def gather_state_dict(module: nn.Module, zero_stage: int) -> dict:
    """Full CPU state dict of `module` on rank 0 (empty dict elsewhere). Under ZeRO-3 each parameter is
    gathered in turn, so only one full parameter is held at a time beyond the result itself."""
    if zero_stage != 3:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if is_rank_0() else {}
    import deepspeed
    state = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if is_rank_0():
                state[name] = param.detach().cpu().clone()
    if is_rank_0():
        # Buffers are not partitioned; non-persistent ones (rotary caches) are not part of a checkpoint.
        persistent = set(module.state_dict().keys())
        state.update({k: b.detach().cpu().clone() for k, b in module.named_buffers() if k in persistent})
    return state


def unwrap(model):
    """The nn.Module inside a DeepSpeed engine (or the module itself)."""
    return getattr(model, "module", model)




def save_hf_format(model, tokenizer, output_dir: str, zero_stage: int = 0, run_config: Optional[dict] = None,
                   extra_files: Optional[dict] = None, max_shard_size: str = "5GB",
                   base_model_name_or_path: Optional[str] = None):
    """Export `model` (a DeepSpeed engine or module) as a Hugging Face directory that `from_pretrained` loads:
    safetensors weights with LoRA merged in, config, generation config, tokenizer and the resolved run config.
    When only LoRA adapters (and a value head) were trained on top of `base_model_name_or_path`, the adapters
    are also written unmerged in peft's layout to `output_dir/adapter` (peft_export.py): a subdirectory, since
    transformers applies an adapter_config.json it finds next to the weights on top of them.

    Everything is written into a temporary directory beside `output_dir` and swapped into place with renames
    when complete (export_swap.py): a killed export leaves the previous directory or the new one, never a mix.
    Collective under ZeRO-3: call it on every rank.
    """
    module = unwrap(model)
    state = gather_state_dict(module, zero_stage)
    if not is_rank_0():
        return
    adapter = None
    if base_model_name_or_path is not None and adapter_reproduces(module):
        task = "SEQ_CLS" if hasattr(module, "hf_export") else "CAUSAL_LM"
        adapter = peft_adapter_files(state, module, base_model_name_or_path, task)
    state = merge_lora_state_dict(state, module)
    # A model may export as another architecture (the reward model as *ForSequenceClassification).
    config, state = module.hf_export(state) if hasattr(module, "hf_export") else (module.config, state)
    # the dtype the weights are written in (an fp32 EMA of a bf16 run, a bf16 model loaded from fp32 files), so
    # that from_pretrained (dtype "auto") loads them as they are
    floats = [v.dtype for v in state.values() if v.is_floating_point()]
    if floats:
        config = copy.copy(config)
        config.dtype = floats[0]
    tmp = new_export_dir(output_dir)
    config.save_pretrained(tmp)
    if getattr(module, "generation_config", None) is not None and not hasattr(module, "hf_export"):
        module.generation_config.save_pretrained(tmp)
    # safetensors, sharded with an index above max_shard_size, as from_pretrained expects.
    save_torch_state_dict({k: v.contiguous() for k, v in state.items()}, tmp, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if adapter is not None:
        write_peft_adapter(os.path.join(tmp, "adapter"), *adapter)
    if run_config is not None:
        write_json(os.path.join(tmp, "training_args.json"), run_config)
    for name, content in (extra_files or {}).items():
        write_json(os.path.join(tmp, name), content)
    swap_into_place(tmp, output_dir)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, fp32: bool = False) -> torch.Tensor:
    """Mean next-token cross entropy over labelled positions.

    logits: (B, T, V), labels: (B, T) with -100 where no loss is taken. Position t predicts token t+1, so
    logits[:, t] is scored against labels[:, t + 1]. The labels are shifted (a -100 column appended) rather than
    the logits sliced: slicing (B, T, V) logits would copy the largest tensor of the step.
    """
    if fp32:
        logits = logits.float()
    shift_labels = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T): the last position has no target
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), shift_labels.reshape(-1),
                                       ignore_index=-100)


"""A Qwen2-family model through step 1 -> step 2 -> DPO -> step 3 with `--chat_template model` (its ChatML template)
and a system prompt, on conversational data in its on-disk layout (local/jsonfile: `messages` rows for SFT,
TRL-style implicit-prompt preference rows, prompt-only rows for step 3), then the chat answering through the
template it finds in the model directory."""
import glob
import json
import os

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import DPO, RM_STATIC, STEP1, STEP2, STEP3, run_launcher
from test_step3_e2e import ppo_args

from alpaca_rlhf.deepspeed_chat.training.utils.data.prompt_format import parse_conversation
from alpaca_rlhf.deepspeed_chat.training.utils.data.raw_datasets import get_raw_dataset

pytestmark = pytest.mark.slow
SYSTEM = "Answer briefly."
TEMPLATE = ["--chat_template", "model", "--system_prompt", SYSTEM]


def _write(folder, rows):
    os.makedirs(folder, exist_ok=True)
    for name, part in (("train.json", rows[:-24]), ("eval.json", rows[-24:])):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The four steps on the micro Qwen2 model; returns the root folder."""
    from alpaca_rlhf.tools.make_tiny_model import make_tiny_model
    root = tmp_path_factory.mktemp("chat-template")
    base = make_tiny_model(str(root / "base"), preset="micro", arch="qwen2")
    examples = get_raw_dataset(RM_STATIC, seed=0).train_examples()[:360]
    conversations = [parse_conversation(e.prompt) for e in examples]
    sft = [{"messages": c + [{"role": "assistant", "content": e.chosen.strip()}]}
           for c, e in zip(conversations, examples)]
    preference = [{"chosen": c + [{"role": "assistant", "content": e.chosen.strip()}],
                   "rejected": c + [{"role": "assistant", "content": e.rejected.strip()}]}
                  for c, e in zip(conversations, examples)]
    preference = [{"prompt": c} for c in conversations[:40]] + preference  # prompt-only rows: step 3 reads them
    _write(str(root / "sft" / "local" / "jsonfile"), sft)
    _write(str(root / "pref" / "local" / "jsonfile"), preference)

    def common(model, out, data, split, *extra):
        return ["--data_path", str(root / data / "local" / "jsonfile"), "--data_split", split,
                "--data_output_path", str(root / "cache"), "--model_name_or_path", model, "--max_seq_len", 128,
                "--output_dir", str(root / out), "--max_eval_samples", 24, "--disable_progress_bar", "--deepspeed",
                "--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 8, "--zero_stage", 2,
                *TEMPLATE, *extra]
    run_launcher(STEP1, common(base, "actor", "sft", "10,0,0", "--learning_rate", 1e-2, "--max_train_steps", 24))
    actor = str(root / "actor")
    lora = ["--lora_dim", 8, "--lora_module_name", "q_proj,k_proj", "--only_optimize_lora"]
    run_launcher(STEP2, common(actor, "critic", "pref", "0,10,0", "--learning_rate", 5e-3, "--max_train_steps", 12,
                               *lora))
    run_launcher(DPO, common(actor, "dpo", "pref", "0,10,0", "--learning_rate", 1e-2, "--max_train_steps", 8, *lora))
    run_launcher(STEP3, ppo_args(actor, str(root / "critic"), str(root / "final"), str(root / "cache3"),
                                 "--data_path", str(root / "pref" / "local" / "jsonfile"), "--data_split", "0,0,10",
                                 "--enable_test_mode", "--test_stop_step", 2, *TEMPLATE))
    return root


def test_sft_labels_are_the_assistant_turns_and_their_end_of_turn(chain):
    tok = AutoTokenizer.from_pretrained(str(chain / "actor"))
    (cache,) = glob.glob(str(chain / "cache" / "phase1_train_*.npz"))
    with np.load(cache) as z:
        ids = z["input_ids.flat"][:z["input_ids.offsets"][1]].tolist()
        labels = z["labels.flat"][:z["labels.offsets"][1]].tolist()
    text = tok.decode(ids)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
    answer = tok.decode([t for t in labels if t != -100])
    assert answer.endswith("<|im_end|>") and text.endswith("<|im_start|>assistant\n" + answer)
    args = json.load(open(chain / "actor" / "training_args.json"))
    assert args["chat_template"] == "model" and args["system_prompt"] == SYSTEM
    history = json.load(open(chain / "actor" / "eval_history.json"))
    assert history[-1]["eval/loss"] < history[0]["eval/loss"]


def test_reward_dpo_and_ppo_ran_on_the_templated_pairs(chain):
    for out in ("critic", "dpo"):
        history = json.load(open(chain / out / "eval_history.json"))
        assert history and all(np.isfinite(v) for h in history for v in h.values() if isinstance(v, float)), out
    rows = [r for r in map(json.loads, open(chain / "final" / "metrics.jsonl")) if "reward/score" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss/policy"]) for r in rows)
    (cache,) = glob.glob(str(chain / "cache3" / "phase3_train_*.npz"))
    tok = AutoTokenizer.from_pretrained(str(chain / "actor"))
    with np.load(cache) as z:
        prompts = [tok.decode(z["prompt_ids.flat"][a:b]) for a, b in zip(z["prompt_ids.offsets"][:-1],
                                                                          z["prompt_ids.offsets"][1:])]
    assert all(p.endswith("<|im_start|>assistant\n") for p in prompts) and len(prompts) >= 350


def test_the_chat_answers_through_the_template_it_finds(chain):
    from alpaca_rlhf.inference.chat_core import GenerationSettings, build_chat_prompt, load_chat_model, stream_answer
    model = load_chat_model(str(chain / "final" / "actor"), dtype="fp32", device="cpu")
    assert model.chat_format.name == "model" and model.chat_format.system_prompt == SYSTEM
    assert model.stop_token_id == model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    text, ids, _ = build_chat_prompt(model.tokenizer, [("Hi", "Hello!")], "What is 2 plus 2?", 1000,
                                     model.chat_format)
    assert text == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    answers = list(stream_answer(model.model, model.tokenizer, ids, GenerationSettings(max_new_tokens=8),
                                 model.stop_token_id))
    assert answers and isinstance(answers[-1], str) and "<|im_" not in answers[-1]


def test_the_evaluation_tool_renders_prompts_and_rewards_through_the_template(chain):
    from alpaca_rlhf.tools import evaluate_demo as ev
    args = ev.parse_args(["--model", str(chain / "final" / "actor"), "--reward_model", str(chain / "critic"),
                          "--num_prompts", "8", "--max_new_tokens", "6", "--batch_size", "8"])
    (result,) = ev.run(args)
    assert result["response_len"] >= 0 and np.isfinite(result["rm_score"]), result
    tok = AutoTokenizer.from_pretrained(str(chain / "actor"))
    fmt = ev.format_for_model(str(chain / "actor"), tok)
    prompt = ev.load_prompts(ev.DEFAULT_DATA, 1)[0]
    text = tok.decode(ev.prompt_ids_for(tok, prompt, fmt))
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}") and text.endswith("<|im_start|>assistant\n")

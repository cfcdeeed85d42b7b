"""Reward functions for step 3 (--reward_function / --eval_reward_function): loaded from a file or a module,
called on a batch, and a failure named with the function and the row."""
import pytest

from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning.reward_function import (RewardFunction,
                                                                                       RewardFunctionError)


def test_a_reward_function_that_fails_names_itself_and_the_row(tmp_path):
    (tmp_path / "bad.py").write_text(
        "def reward(prompts, answers):\n"
        "    return [1.0 / len(a) for a in answers]\n"
        "def short(prompts, answers):\n"
        "    return [0.0]\n")
    fn = RewardFunction(f"{tmp_path / 'bad.py'}:reward")
    assert fn(["p1", "p2"], ["ab", "a"]).tolist() == [0.5, 1.0]
    with pytest.raises(RewardFunctionError, match=r"bad.py:reward raised on row 1 \(prompt 'p2'\): ZeroDivisionError"):
        fn(["p1", "p2"], ["ab", ""])
    with pytest.raises(RewardFunctionError, match="returned 1 scores for 2 answers"):
        RewardFunction(f"{tmp_path / 'bad.py'}:short")(["p1", "p2"], ["a", "b"])
    with pytest.raises(RewardFunctionError, match="has no function missing"):
        RewardFunction(f"{tmp_path / 'bad.py'}:missing")
    with pytest.raises(RewardFunctionError, match="cannot import no_such_module"):
        RewardFunction("no_such_module:reward")
    demo = RewardFunction("alpaca_rlhf.tools.demo_task:reward")
    assert demo(["not a demo prompt"], ["x"]).tolist() == [0.0]

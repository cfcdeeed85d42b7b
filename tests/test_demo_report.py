"""The demo report: tables from evaluation.json and reward_stats.json, plots from each stage's metrics.jsonl."""
import json
import os

from alpaca_rlhf.tools.demo_report import main, read_jsonl, series, write_report


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def fake_demo(root):
    write_jsonl(str(root / "actor" / "metrics.jsonl"), [{"step": s, "loss/train": 3.0 / s} for s in range(1, 6)]
                + [{"step": 5, "eval/loss": 0.5}])
    write_jsonl(str(root / "final" / "metrics.jsonl"),
                [{"step": s, "reward/score": 0.1 * s, "reward/score_raw": s, "objective/kl": 0.01 * s,
                  "gen/response_len": 8.0, "gen/response_len_min": 3.0} for s in range(1, 4)]
                + [{"step": 2, "reward/score": 9.0}])  # a resumed run repeating step 2: the last value counts
    os.makedirs(root / "critic")
    json.dump({"accuracy": 0.91}, open(root / "critic" / "reward_stats.json", "w"))
    sample = {"prompt": "\n\nHuman: What is 1 plus 1?\n\nAssistant:", "answer": " 1 plus 1 is 2.",
              "demo_score": 1.0, "rm_score": 2.5}
    results = [{"model": str(root / sub), "demo_score": score, "demo_correct": 0.5, "rm_score": 1.0,
                "kl_to_reference": 0.1, "response_len": 8.0, "empty_frac": 0.0, "samples": [sample]}
               for sub, score in (("actor", 0.61), ("dpo", 0.62), (os.path.join("final", "actor"), 0.63))]
    json.dump({"results": results}, open(root / "evaluation.json", "w"))
    drawn = [dict(r, demo_score=r["demo_score"] - 0.2, demo_correct=0.25) for r in results]
    json.dump({"results": drawn}, open(root / "evaluation_sampled.json", "w"))


def test_report_has_stage_table_samples_and_plots(tmp_path):
    fake_demo(tmp_path)
    path = write_report(str(tmp_path), total_seconds=600)
    report = open(path).read()
    assert "Pipeline time: 10.0 min." in report
    assert "| SFT | 0.610 | 0.500 | 0.410 | 0.250 |" in report and "| DPO | 0.620 |" in report
    assert "| PPO | 0.630 | 0.500 | 0.430 | 0.250 |" in report  # greedy, then sampled
    assert "0.910 |" in report  # reward-model accuracy from reward_stats.json
    assert "| What is 1 plus 1? | 1 plus 1 is 2. (1.00 / 2.50)" in report
    for name in ("step1_loss.png", "step3_reward.png", "step3_kl.png", "step3_response_len.png"):
        png = tmp_path / "plots" / name
        assert png.exists() and png.stat().st_size > 1000 and f"plots/{name}" in report
    assert not (tmp_path / "plots" / "step2_loss.png").exists()  # no step-2 metrics: no plot, no failure


def test_missing_demo_dir_is_an_error(tmp_path, capsys):
    assert main(["--demo_dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_series_keeps_the_last_value_of_a_repeated_step(tmp_path):
    fake_demo(tmp_path)
    steps, values = series(read_jsonl(str(tmp_path / "final" / "metrics.jsonl")), "reward/score")
    assert steps == [1, 2, 3] and values[1] == 9.0

"""Write the demo's report: a table per stage, sample answers, and PNG plots of the training curves.

    python -m alpaca_rlhf.tools.demo_report --demo_dir runs/demo

Reads what the stages left in DEMO_DIR (metrics.jsonl of each step, the reward model's reward_stats.json,
evaluation.json and evaluation_sampled.json from evaluate_demo) and writes DEMO_DIR/report.md and
DEMO_DIR/plots/*.png. Stages that are missing are left out of the report rather than failing it.
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Optional

STAGES = [("SFT", "actor"), ("DPO", "dpo"), ("PPO", os.path.join("final", "actor")),
          ("GRPO", os.path.join("grpo", "actor"))]
CURVES = {  # plot file -> (stage directory, [(metric, label)])
    "step1_loss.png": ("actor", [("loss/train", "train loss"), ("eval/loss", "eval loss")]),
    "step2_loss.png": ("critic", [("loss/train", "train loss"), ("eval/accuracy", "eval accuracy")]),
    "step3_reward.png": ("final", [("reward/score", "reward (normalised)"), ("reward/score_raw", "reward (raw)")]),
    "step3_ground_truth.png": ("final", [("reward/ground_truth", "ground truth of the sampled answers"),
                                         ("eval/ground_truth", "ground truth, held-out greedy")]),
    "step3_kl.png": ("final", [("objective/kl", "KL to reference per answer")]),
    "grpo_ground_truth.png": ("grpo", [("reward/ground_truth", "ground truth of the sampled answers (the reward)"),
                                       ("eval/ground_truth", "ground truth, held-out greedy")]),
    "step3_response_len.png": ("final", [("gen/response_len", "mean answer tokens"),
                                         ("gen/response_len_min", "shortest answer")]),
}


def read_jsonl(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def series(rows: List[dict], key: str):
    """(steps, values) of one metric; a resumed run may log a step twice, the last value counts."""
    points: Dict[int, float] = {}
    for row in rows:
        if key in row:
            points[row["step"]] = row[key]
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def plot_curves(demo_dir: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    out_dir = os.path.join(demo_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, (stage, metrics) in CURVES.items():
        rows = read_jsonl(os.path.join(demo_dir, stage, "metrics.jsonl"))
        lines = [(label, *series(rows, key)) for key, label in metrics]
        lines = [line for line in lines if line[1]]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        for label, steps, values in lines:
            ax.plot(steps, values, label=label, marker="." if len(steps) < 30 else None)
        ax.set_xlabel("optimizer step" if stage not in ("final", "grpo") else "iteration")
        ax.set_title(name[:-4].replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path + ".tmp.png")
        plt.close(fig)
        os.replace(path + ".tmp.png", path)
        written.append(os.path.relpath(path, demo_dir))
    return written


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _by_model(evaluation: Optional[dict]) -> Dict[str, dict]:
    return {os.path.normpath(r["model"]): r for r in (evaluation or {}).get("results", [])}


def stage_table(demo_dir: str, evaluation: dict, rm_stats: Optional[dict], sampled: Optional[dict] = None) -> List[str]:
    """One row per stage: greedy answers (and sampled ones, as PPO trains on them, when evaluated)."""
    greedy_rows, sampled_rows = _by_model(evaluation), _by_model(sampled)
    lines = ["| stage | ground truth (greedy) | correct (greedy) | ground truth (sampled) | correct (sampled) | "
             "reward-model score | KL to SFT | answer tokens | empty | RM held-out accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    accuracy = fmt(rm_stats.get("accuracy")) if rm_stats else "-"
    for label, sub in STAGES:
        key = os.path.normpath(os.path.join(demo_dir, sub))
        result, drawn = greedy_rows.get(key), sampled_rows.get(key, {})
        if result is None:
            continue
        lines.append(f"| {label} | {fmt(result.get('demo_score'))} | {fmt(result.get('demo_correct'))} | "
                     f"{fmt(drawn.get('demo_score'))} | {fmt(drawn.get('demo_correct'))} | "
                     f"{fmt(result.get('rm_score'))} | {fmt(result.get('kl_to_reference'))} | "
                     f"{fmt(result.get('response_len'), 1)} | {fmt(result.get('empty_frac'))} | {accuracy} |")
    return lines


def stage_label(demo_dir: str, model_path: str) -> str:
    for label, sub in STAGES:
        if os.path.normpath(os.path.join(demo_dir, sub)) == os.path.normpath(model_path):
            return label
    return os.path.basename(os.path.normpath(model_path))


def sample_table(demo_dir: str, evaluation: dict, rows: int = 6) -> List[str]:
    """The same held-out prompts answered by each stage, with the ground-truth and reward-model scores."""
    results = (evaluation or {}).get("results", [])
    if not results:
        return []
    header = "| prompt | " + " | ".join(stage_label(demo_dir, r["model"]) for r in results) + " |"
    lines = [header, "|---" * (len(results) + 1) + "|"]
    for i in range(min(rows, min(len(r["samples"]) for r in results))):
        question = results[0]["samples"][i]["prompt"].strip().split("Human:")[-1].replace("Assistant:", "").strip()
        cells = []
        for r in results:
            s = r["samples"][i]
            cells.append(f"{s['answer'].strip()[:60]} ({fmt(s.get('demo_score'), 2)} / {fmt(s.get('rm_score'), 2)})")
        lines.append(f"| {question[:60]} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return lines


def write_report(demo_dir: str, total_seconds: Optional[float] = None) -> str:
    evaluation = read_json(os.path.join(demo_dir, "evaluation.json"))
    sampled = read_json(os.path.join(demo_dir, "evaluation_sampled.json"))
    rm_stats = read_json(os.path.join(demo_dir, "critic", "reward_stats.json"))
    plots = plot_curves(demo_dir)
    parts = ["# alpaca_rlhf demo report", ""]
    if total_seconds is not None:
        parts += [f"Pipeline time: {total_seconds / 60:.1f} min.", ""]
    parts += ["## Stages on held-out demo prompts", ""] + stage_table(demo_dir, evaluation, rm_stats, sampled)
    parts += ["", "Ground truth: the demo task's own grader (0-1) and the share of answers with the right value, for "
              "greedy answers and for answers sampled at temperature 1 (how PPO generates while it trains). "
              "Reward-model score (raw), KL to SFT (summed over each answer's tokens), answer tokens and empty "
              "answers: greedy answers.", ""]
    samples = sample_table(demo_dir, evaluation)
    if samples:
        parts += ["## The same prompts, answered by each stage (ground truth / reward model)", ""] + samples + [""]
    if plots:
        parts += ["## Curves", ""] + [f"![{os.path.basename(p)}]({p})" for p in plots] + [""]
    parts += ["## Chat with the result", "", "    sh run_inference.sh 0 alpaca_rlhf/inference/llama_chatbot_gradio.py "
              f"--path {os.path.join(demo_dir, 'actor')} --path {os.path.join(demo_dir, 'final', 'actor')}", ""]
    path = os.path.join(demo_dir, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(parts))
    os.replace(path + ".tmp", path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write DEMO_DIR/report.md and plots from a finished demo run.")
    parser.add_argument("--demo_dir", default="runs/demo", help="The demo's output directory. Default runs/demo.")
    parser.add_argument("--total_seconds", type=float, default=None, help="Pipeline time to print in the report.")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.demo_dir):
        print(f"error: --demo_dir {args.demo_dir} does not exist (run make demo first)", file=sys.stderr)
        return 2
    print(f"wrote {write_report(args.demo_dir, args.total_seconds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

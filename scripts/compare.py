"""Side-by-side comparisons on real data with a real offline backbone, several seeds each.

    python scripts/compare.py methods   # prompt tuning vs SMoP vs SuperPos (dropout on/off) vs Residual
    python scripts/compare.py fpt       # prompt tuning, constant schedule vs FPT depth / width / compound

Each run is its own `ptlab-train` process (so peak memory is per run) with identical trainer
settings; finished runs are skipped, so an interrupted comparison continues where it stopped.
Prints one markdown table (arm x task: mean +- std of the task's main validation metric over seeds,
trainable parameters, training time per step, peak RSS, training FLOPs) and writes it under
docs/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# preset -> (tasks, [(label, run folder name, overrides)]). Dropout is off for every arm
# (Lester et al.'s recipe, part of SuperPos-Prompt and FPT) except where it is the ablation.
PRESETS = {
    "methods": (
        ["sst2", "cola"],
        [
            (
                "prompt_tuning (20 tok)",
                "prompt_tuning",
                ["method=prompt_tuning", "method.prompt_length=20", "backbone.dropout=false"],
            ),
            ("smop (4x5)", "smop", ["method=smop", "backbone.dropout=false"]),
            ("superpos (10 tok, m=128)", "superpos", ["method=superpos", "backbone.dropout=false"]),
            ("superpos, dropout on", "superpos_dropout_on", ["method=superpos", "backbone.dropout=true"]),
            ("residual (10 tok, b=800)", "residual", ["method=residual", "backbone.dropout=false"]),
        ],
    ),
    "fpt": (
        ["sst2"],
        [
            ("prompt tuning, constant", "constant", ["preset=fpt", "schedule=constant"]),
            ("FPT-LD (depth)", "fpt_depth", ["preset=fpt", "schedule=fpt_depth"]),
            ("FPT-FR (width)", "fpt_width", ["preset=fpt", "schedule=fpt_width"]),
            ("FPT-CR (compound)", "fpt", ["preset=fpt", "schedule=fpt"]),
        ],
    ),
}


def run_one(run_dir: Path, overrides: list[str]) -> dict:
    summary = run_dir / "summary.json"
    if not summary.exists():
        command = [sys.executable, "-m", "ptlab.train", *overrides, "logger=none", f"hydra.run.dir={run_dir}"]
        env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"run failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return json.loads(summary.read_text())


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * spread:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--backbone", default="minilm_l6")
    parser.add_argument("--tasks", nargs="+", help="default: the preset's")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-examples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: steady timings)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each uses --threads)")
    parser.add_argument("--runs-dir", type=Path, help="default: outputs/compare/<preset>")
    parser.add_argument("--out", type=Path, help="default: docs/results/<preset>.md")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    args = parser.parse_args()
    default_tasks, arms = PRESETS[args.preset]
    tasks = args.tasks or default_tasks
    runs_dir = args.runs_dir or REPO / "outputs" / "compare" / args.preset
    out = args.out or REPO / "docs" / "results" / f"{args.preset}.md"

    common = [
        f"backbone={args.backbone}",
        f"trainer.max_steps={args.steps}",
        f"trainer.eval_every={args.steps}",
        f"data.max_eval_examples={args.eval_examples}",
        f"hardware.num_threads={args.threads}",
        *args.extra,
    ]
    jobs = [
        (label, slug, task, seed, [*common, *overrides, f"task={task}", f"seed={seed}"])
        for label, slug, overrides in arms
        for task in tasks
        for seed in args.seeds
    ]
    started = time.perf_counter()

    def work(job):
        label, slug, task, seed, overrides = job
        summary = run_one(runs_dir / args.backbone / slug / task / f"seed{seed}", overrides)
        print(
            f"{label:28s} {task:6s} seed {seed}: {summary['main_metric']}={summary['best'][summary['main_metric']]:.4f}",
            flush=True,
        )
        return summary

    with ThreadPoolExecutor(args.jobs) as pool:
        summaries = list(pool.map(work, jobs))

    rows, floors = [], {}
    for label, _, _ in arms:
        mine = [(job, s) for job, s in zip(jobs, summaries) if job[0] == label]
        cells = []
        for task in tasks:
            per_task = [s for job, s in mine if job[2] == task]
            cells.append(mean_std([s["best"][s["main_metric"]] for s in per_task]))
            floors[task] = (per_task[0]["main_metric"], per_task[0]["majority_class"])
        runs = [s for _, s in mine]
        rows.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {runs[0]['trainable_params']:,}"
            + f" | {statistics.mean(1000 * s['train_seconds'] / s['steps'] for s in runs):.0f}"
            + f" | {mean_std([s['train_seconds'] for s in runs], scale=1.0, digits=0)}"
            + f" | {statistics.mean(s['train_flops'] for s in runs) / 1e12:.2f}"
            + f" | {statistics.mean(s['flops_ratio'] for s in runs):.2f}"
            + f" | {max(s['peak_memory_mb'] for s in runs):.0f} |"
        )
    header = (
        "| arm | "
        + " | ".join(f"{t} ({floors[t][0]})" for t in tasks)
        + " | trainable params | train ms/step | train s | train TFLOPs | FLOPs vs full | peak RSS MB |"
    )
    table = "\n".join([header, "|" + "---|" * (len(tasks) + 7), *rows])
    floor = ", ".join(f"{t}: majority-class accuracy {100 * m[1]:.1f}" for t, m in floors.items())
    command = "python scripts/compare.py " + " ".join(sys.argv[1:])
    text = (
        f"# Comparison: {args.preset}\n\nCommand: `{command}`\n\n"
        f"Backbone `{args.backbone}` (frozen), {args.steps} steps of batch 32 with the default trainer (AdamW lr 3e-3), "
        f"validation on {args.eval_examples} examples, seeds {args.seeds}, {args.threads} torch thread(s) per run, "
        f"{args.jobs} run(s) at a time, CPU. Metrics: mean ± std over seeds of the main validation metric, in %; "
        f"train s: training wall time (mean ± std); FLOPs: analytic (ptlab/flops.py). Floor: {floor}. "
        f"Total wall time {(time.perf_counter() - started) / 60:.1f} min.\n\n{table}\n"
    )
    print("\n" + table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()

"""Compare the prompt methods on real tasks with a real offline backbone, several seeds each.

Each run is its own `ptlab-train` process (so peak memory is per run) with the same trainer
settings; finished runs are skipped, so an interrupted comparison continues where it stopped.
Prints one markdown table (method x task: mean +- std of the task's main validation metric,
trainable parameters, training time per step, peak RSS) and writes it to --out.

    python scripts/compare_methods.py            # defaults: MiniLM, SST-2 + CoLA, 3 seeds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# label -> overrides. Dropout is off for every method (Lester et al.'s recipe and part of
# SuperPos-Prompt), and SuperPos also runs with it on, where the paper says it matters.
METHODS = [  # (label, run folder name, overrides)
    (
        "prompt_tuning (20 tok)",
        "prompt_tuning",
        ["method=prompt_tuning", "method.prompt_length=20", "backbone.dropout=false"],
    ),
    ("smop (4x5)", "smop", ["method=smop", "backbone.dropout=false"]),
    ("superpos (10 tok, m=128)", "superpos", ["method=superpos"]),
    ("superpos, dropout on", "superpos_dropout_on", ["method=superpos", "backbone.dropout=true"]),
    ("residual (10 tok, b=800)", "residual", ["method=residual", "backbone.dropout=false"]),
]


def run_one(run_dir: Path, overrides: list[str]) -> dict:
    summary = run_dir / "summary.json"
    if not summary.exists():
        command = [sys.executable, "-m", "ptlab.train", *overrides, "logger=none", f"hydra.run.dir={run_dir}"]
        env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"run failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return json.loads(summary.read_text())


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="minilm_l6")
    parser.add_argument("--tasks", nargs="+", default=["sst2", "cola"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-examples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: steady timings)")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "outputs" / "compare_methods")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "compare_methods.md")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    args = parser.parse_args()

    common = [
        f"backbone={args.backbone}",
        f"trainer.max_steps={args.steps}",
        f"trainer.eval_every={args.steps}",
        f"data.max_eval_examples={args.eval_examples}",
        f"hardware.num_threads={args.threads}",
        *args.extra,
    ]
    started = time.perf_counter()
    rows, majority = [], {}
    for label, slug, method_overrides in METHODS:
        cells, params, step_ms, memory = [], None, [], []
        for task in args.tasks:
            scores = []
            for seed in args.seeds:
                run_dir = args.runs_dir / args.backbone / slug / task / f"seed{seed}"
                summary = run_one(run_dir, [*common, *method_overrides, f"task={task}", f"seed={seed}"])
                scores.append(summary["best"][summary["main_metric"]])
                majority[task] = (summary["main_metric"], summary["majority_class"])
                params = summary["trainable_params"]
                step_ms.append(1000 * summary["train_seconds"] / summary["steps"])
                memory.append(summary["peak_memory_mb"])
                print(
                    f"{label:28s} {task:6s} seed {seed}: {summary['main_metric']}={scores[-1]:.4f}",
                    flush=True,
                )
            cells.append(mean_std(scores))
        rows.append((label, cells, params, statistics.mean(step_ms), max(memory)))

    header = (
        "| method | "
        + " | ".join(f"{t} ({majority[t][0]})" for t in args.tasks)
        + " | trainable params | train ms/step | peak RSS MB |"
    )
    lines = [header, "|" + "---|" * (len(args.tasks) + 4)]
    for label, cells, params, ms, mb in rows:
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {params:,} | {ms:.0f} | {mb:.0f} |")
    floor = ", ".join(f"{t}: majority class acc {100 * m[1]:.1f}" for t, m in majority.items())
    command = "python scripts/compare_methods.py " + " ".join(sys.argv[1:])
    table = "\n".join(lines)
    text = (
        f"# Method comparison on real data\n\nCommand: `{command.strip()}`\n\n"
        f"Backbone `{args.backbone}` (frozen), {args.steps} steps of batch 32 (AdamW lr 3e-3, the default trainer), "
        f"validation on {args.eval_examples} examples, seeds {args.seeds}, {args.threads} torch thread(s) per run, "
        f"CPU. Values: mean ± std over seeds of the main validation metric, in %. Floor: {floor}.\n"
        f"Total wall time: {(time.perf_counter() - started) / 60:.1f} min.\n\n{table}\n"
    )
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()

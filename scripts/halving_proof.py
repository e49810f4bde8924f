"""Successive halving against the full grid on one lr search, in one run (docs/results/halving.md).

    python scripts/halving_proof.py                          # MiniLM SST-2: 5 arms x 6 lrs, 300 steps
    python scripts/halving_proof.py --backbone tiny_t5 --steps 27 --train-examples 256 --eval-examples 64

The arms are the comparison's recipes: PT-20, PT-100, SuperPos and Residual with AdamW (lrs 0.001 to
0.3), and SMoP with its paper's Adafactor (`optim=smop2023`, lrs 0.01 to 1.0, the paper's 0.5
among them). Their lr lists differ, so each contender is two packed sweeps (the AdamW arms, then
SMoP). The grid trains every run to the end; halving runs the same sweeps with
`hydra.launcher.halving={eta: 3, rungs: 3, within: [recipe]}`. Both evaluate every `--eval-every`
steps; halving also looks at its rung steps, a look that leaves a run's best prompt and patience
as the grid's. The table: steps trained and wall seconds, halving / grid; per arm the lr halving
kept against the grid's best and their validation; and the largest difference between a
survivor's final metrics and its grid run's. The records (each run's summary, `halving.json`) go
beside the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
ARMS = {  # sweep -> its recipes and lrs
    "adamw": (["pt20", "pt100", "superpos", "residual"], [0.001, 0.003, 0.01, 0.03, 0.1, 0.3], []),
    "smop": (["smop"], [0.01, 0.03, 0.1, 0.3, 0.5, 1.0], ["optim=smop2023"]),
}
HALVING = "hydra.launcher.halving={eta: 3, rungs: 3, within: [recipe]}"


def sweep(folder: Path, name: str, args: argparse.Namespace, halving: bool) -> float:
    """One packed sweep (`name` of ARMS) into `folder`; its wall seconds."""
    recipes, lrs, extra = ARMS[name]
    command = [sys.executable, "-m", "ptlab.cli.train", "-m", "hydra/launcher=packed", f"hydra.sweep.dir={folder}",
               f"backbone={args.backbone}", "logger=none", "seed=0", f"recipe={','.join(recipes)}",
               f"trainer.lr={','.join(map(str, lrs))}", *extra, f"trainer.max_steps={args.steps}",
               f"trainer.batch_size={args.batch_size}", f"trainer.eval_every={args.eval_every}",
               f"data.max_eval_examples={args.eval_examples}", "trainer.log_every=1000",
               *([f"data.max_train_examples={args.train_examples}"] if args.train_examples else []),
               *([HALVING] if halving else [])]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TQDM_DISABLE": "1", "PTLAB_DATA_DIR": os.environ.get("PTLAB_DATA_DIR", str(REPO.parent / "shared" / "data"))}  # fmt: skip
    print(f"halving_proof: {'halving' if halving else 'grid'} {name}: {' '.join(command[2:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"halving_proof: the {name} sweep failed:\n{done.stderr[-3000:]}")
    return seconds


def runs_of(folder: Path) -> List[Dict]:
    """Each run of a sweep folder: its recipe, lr, status, steps, rung and validation."""
    runs = []
    for summary_file in sorted(folder.glob("*/summary.json"), key=lambda p: int(p.parent.name)):
        summary = json.loads(summary_file.read_text())
        overrides = (summary_file.parent / ".hydra" / "overrides.yaml").read_text()
        recipe = next(line.split("=", 1)[1] for line in overrides.splitlines() if "recipe=" in line).strip()
        lr = next(line.split("=", 1)[1] for line in overrides.splitlines() if "trainer.lr=" in line).strip()
        metric = summary["main_metric"]
        runs.append({"job": int(summary_file.parent.name), "recipe": recipe, "lr": float(lr), "status": summary["status"],
                     "steps": summary["steps"], "rung": summary.get("rung"), "best": summary["best"].get(metric),
                     "final": summary["final"]}) # fmt: skip
    return runs


def table(grid: List[Dict], halved: List[Dict], seconds: Dict[str, float], metric: str) -> List[str]:
    steps = {name: sum(run["steps"] for run in runs) for name, runs in (("grid", grid), ("halving", halved))}
    lines = ["| | grid | halving | halving / grid |", "|---|---|---|---|",
             f"| steps trained | {steps['grid']} | {steps['halving']} | {steps['halving'] / steps['grid']:.2f} |",
             f"| wall s | {seconds['grid']:.0f} | {seconds['halving']:.0f} | {seconds['halving'] / seconds['grid']:.2f} |",
             "", f"| arm | grid's best lr | its best {metric} | halving's lr | its best {metric} | same lr |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    worst = 0.0
    for recipe in dict.fromkeys(run["recipe"] for run in grid):
        best = max((run for run in grid if run["recipe"] == recipe), key=lambda run: (run["best"], -run["job"]))
        kept = next(run for run in halved if run["recipe"] == recipe and run["status"] == "finished")
        lines.append(f"| {recipe} | {best['lr']:g} | {100 * best['best']:.1f} | {kept['lr']:g} | {100 * kept['best']:.1f} | "
                     f"{'yes' if best['lr'] == kept['lr'] else 'no'} |")  # fmt: skip
        twin = next(run for run in grid if run["recipe"] == recipe and run["lr"] == kept["lr"])
        worst = max([worst, abs(kept["best"] - twin["best"])] +
                    [abs(kept["final"][k] - twin["final"][k]) for k in twin["final"] if isinstance(twin["final"][k], float)])  # fmt: skip
    lines += ["", f"Largest difference between a survivor's best and final validation metrics and its grid run's: {worst:.1e}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm_l6")
    parser.add_argument("--steps", type=int, default=300, help="each run's trainer.max_steps (rungs at 1/9, 1/3, 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-examples", type=int, default=256, help="validation examples (data.max_eval_examples)")
    parser.add_argument("--train-examples", type=int, default=None, help="data.max_train_examples (default: all)")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "halving_proof", help="the sweeps' folders")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "halving", help="records and table")
    parser.add_argument("--sweeps", nargs="+", choices=list(ARMS), default=list(ARMS),
                        help="which sweeps of the search to run (default: all: the AdamW arms and SMoP)")  # fmt: skip
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    seconds = {"grid": 0.0, "halving": 0.0}
    for contender in ("grid", "halving"):
        for name in args.sweeps:
            seconds[contender] += sweep(args.work / contender / name, name, args, contender == "halving")
    runs = {c: [run for name in args.sweeps for run in runs_of(args.work / c / name)] for c in seconds}
    metric = json.loads(next((args.work / "grid" / args.sweeps[0]).glob("*/summary.json")).read_text())["main_metric"]
    lines = ["Made by `python scripts/halving_proof.py " + " ".join(sys.argv[1:]) + "`", "", *table(runs["grid"], runs["halving"], seconds, metric)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    (args.out / "runs.json").write_text(json.dumps(runs, indent=1))
    for name in args.sweeps:
        shutil.copy(args.work / "halving" / name / "halving.json", args.out / f"halving_{name}.json")
    print("\n".join(lines))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

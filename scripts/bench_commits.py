"""A solo run's training speed here vs at another commit, in one run: the real loop of each.

    python scripts/bench_commits.py --base f74ab39              # dropout on and off, MiniLM + tiny T5
    python scripts/bench_commits.py --base f74ab39 --repeats 5 --steps 60

Each contender is a real `ptlab-train` run (`logger=none`, evaluation only at its end, one thread)
of the code at a commit: the base commit is checked out into a git worktree under outputs/bench/
and run from there with this venv. Runs alternate (base, here, base, here, ...) so that a busy
machine slows both alike; the table gives the median train seconds per step of each (the steps'
own time, `summary.json`'s `train_seconds`) and their ratio (base / here: > 1 is faster here),
and the median of (wall - load) per run, which also counts evaluation and checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETUPS = {
    "minilm_l6 + sst2 (default job), batch 32": ["trainer.batch_size=32"],
    "tiny_t5 + sst2, batch 8": ["backbone=tiny_t5", "trainer.batch_size=8"],
}


def checkout(commit: str) -> Path:
    """The code at `commit`, in a worktree of this repository (made once, reused)."""
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()  # fmt: skip
    tree = REPO / "outputs" / "bench" / f"tree-{sha}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=REPO, check=True,
                       capture_output=True)  # fmt: skip
    return tree


def timed_run(tree: Path, overrides: list[str], steps: int) -> tuple[float, float]:
    """One run of the code in `tree`: (train seconds per step, wall - load seconds)."""
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "PTLAB_DATA_DIR": os.environ.get("PTLAB_DATA_DIR", str(REPO.parent / "shared" / "data"))}
        command = [sys.executable, "-m", "ptlab.cli.train", "logger=none", "hardware.num_threads=1",
                   f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", "trainer.log_every=1000",
                   f"hydra.run.dir={run_dir}", *overrides]  # fmt: skip
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bench_commits: {tree.name}: {' '.join(overrides)} failed:\n{done.stderr[-2000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
        return summary["train_seconds"] / summary["steps"], summary["wall_seconds"] - summary["load_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the commit to compare with (e.g. f74ab39)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--dropout", nargs="+", choices=["on", "off"], default=["on", "off"])
    args = parser.parse_args()
    trees = {"base": checkout(args.base), "here": REPO}
    rows = []
    for setup in args.setups:
        for dropout in ("true" if d == "on" else "false" for d in args.dropout):
            overrides = [*SETUPS[setup], f"backbone.dropout={dropout}"]
            times = {name: [] for name in trees}
            for _ in range(args.repeats):
                for name, tree in trees.items():
                    times[name].append(timed_run(tree, overrides, args.steps))
                    print(f"{setup}, dropout {dropout}, {name}: {times[name][-1][0] * 1e3:.0f} ms/step", flush=True)
            step = {name: statistics.median(t[0] for t in runs) for name, runs in times.items()}
            wall = {name: statistics.median(t[1] for t in runs) for name, runs in times.items()}
            rows.append(f"| {setup}, dropout {'on' if dropout == 'true' else 'off'} | {step['base'] * 1e3:.0f} | "
                        f"{step['here'] * 1e3:.0f} | {step['base'] / step['here']:.2f}x | {wall['base']:.1f} | "
                        f"{wall['here']:.1f} | {wall['base'] / wall['here']:.2f}x |")  # fmt: skip
    print(f"\nsolo runs, {args.steps} steps, median of {args.repeats}, one thread; base = {args.base}\n")
    print("| run | base ms/step | here ms/step | speed here | base wall-load s | here wall-load s | speed here |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n(machine: {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()

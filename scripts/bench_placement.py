"""A packed sweep's wall time in one process vs its packs on several workers at once, in one run.

    python scripts/bench_placement.py                      # 8 MiniLM jobs, packs of 4: 1 process vs 2 workers
    python scripts/bench_placement.py --backbone tiny_t5 --workers 2 4 --jobs 16 --steps 40

Each contender is the same real `ptlab-train -m hydra/launcher=packed` sweep (MiniLM on SST-2,
one thread per pack, `logger=none`), from the command to its end, in a fresh sweep folder; the
contenders alternate (1, N, 1, N, ...) so that a busy machine slows both alike. The table gives
the median wall seconds of each and the ratio to one process (> 1: faster). On a CPU, N workers
split the cores, so the ratio is bounded by the cores; on a GPU machine it is the GPUs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit.backbones import PACK_BACKBONES  # bench.py's backbones and random-init shapes of real ones

REPO = Path(__file__).resolve().parent.parent


def sweep_seconds(workers: int, jobs: int, pack_size: int, steps: int, backbone: str, hardware: str) -> float:
    """Wall seconds of one sweep of `jobs` runs (seeds x 2 methods, mixed in packs) on `workers` processes."""
    seeds = ",".join(str(seed) for seed in range(jobs // 2))
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "ptlab.cli.train", "-m", "hydra/launcher=packed",
                   f"hydra.launcher.pack_size={pack_size}", f"hydra.launcher.workers={workers}",
                   f"hydra.sweep.dir={folder}/sweep", *PACK_BACKBONES[backbone], f"hardware={hardware}", "logger=none",
                   "hardware.num_threads=1", "data.max_train_examples=2048", "data.max_eval_examples=128",
                   f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", "trainer.log_every=1000",
                   f"seed={seeds}", "method=prompt_tuning,smop", "hydra.launcher.mix_widths=true"]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PTLAB_DATA_DIR": os.environ.get("PTLAB_DATA_DIR", str(REPO.parent / "shared" / "data"))}  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"bench_placement: workers={workers} failed:\n{done.stderr[-2000:]}")
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="worker counts to set against 1")
    parser.add_argument("--jobs", type=int, default=8, help="runs in the sweep (an even number)")
    parser.add_argument("--pack-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbone", default="minilm_l6", choices=sorted(PACK_BACKBONES))
    parser.add_argument("--hardware", default="cpu", help="cpu, or gpu: one worker per GPU")
    args = parser.parse_args()
    times = {n: [] for n in [1, *args.workers]}
    for _ in range(args.repeats):
        for n in times:
            times[n].append(sweep_seconds(n, args.jobs, args.pack_size, args.steps, args.backbone, args.hardware))
    one = statistics.median(times[1])
    print(f"## {args.jobs}-job packed sweep, packs of {args.pack_size}, {args.backbone}, {args.steps} steps, "
          f"median of {args.repeats}, {len(os.sched_getaffinity(0))} cores\n")  # fmt: skip
    print("| placement | wall s | vs one process |")
    print("|---|---|---|")
    for n, values in times.items():
        name = "one process" if n == 1 else f"hydra.launcher.workers={n}"
        print(f"| {name} | {statistics.median(values):.1f} | {one / statistics.median(values):.2f}x |")


if __name__ == "__main__":
    main()

"""Speed and memory, side by side in one process: ptlab vs HuggingFace PEFT and vs the long prompt.

    python scripts/bench.py                    # CPU, fp32: T5-base-shaped (random) + SmolLM2-135M (real)
    python scripts/bench.py --device cuda      # CUDA, bf16 autocast
    python scripts/bench.py --quick            # fewer repeats, for a smoke test
    python scripts/bench.py --sections packed  # only packed sweeps vs the same runs one after another

Every comparison runs interleaved (A B A B ...) after a warm-up on identical inputs and reports
the median; it prints one markdown table of ratios last and writes JSON under outputs/bench/.
Memory is what a training step adds on top of the loaded model: CUDA max allocated on GPU, the
RSS high-water mark (reset per contender) on CPU. After the fixed-shape comparisons come the
real-data ones: length-grouped vs random batches on SST-2, evaluation of SST-2 validation with
SmolLM2 (ptlab rank vs PEFT generate), and time to accuracy (ptlab's default recipe vs PEFT).
On request (`--sections packed`, not in the default set): a sweep of K runs trained packed over one
backbone (`ptlab.training.job.run_jobs`) vs the same K runs one after another (`job.run`).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import torch
from benchkit.common import Bench
from benchkit.fixed import bench_backbone
from benchkit.grouping import length_grouping
from benchkit.options import parse_args
from benchkit.packed import packed_sweep
from benchkit.real_eval import real_eval
from benchkit.tta import time_to_accuracy


def main() -> None:
    args = parse_args(__doc__)
    device = torch.device(args.device)
    bench = Bench(
        args,
        device,
        sync=torch.cuda.synchronize if device.type == "cuda" else (lambda: None),
        autocast=(
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
            if device.type == "cuda"
            else contextlib.nullcontext
        ),
        results={"args": vars(args) | {"out": str(args.out)}},
    )

    sections = set(args.sections)
    if "fixed" in sections:
        for name in args.backbones:
            bench_backbone(bench, name)
    if "grouping" in sections and args.grouping_batches > 0:
        length_grouping(bench)
    if "eval" in sections and args.real_eval:
        real_eval(bench)
    if "tta" in sections and args.tta_target > 0 and device.type == "cpu":
        time_to_accuracy(bench)
    if "packed" in sections:
        packed_sweep(bench)

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"bench-{args.device}-{stamp}.json").write_text(
        json.dumps(bench.results, indent=2, default=str)
    )
    shapes = (
        f", batch {args.batch}, {args.seq_len} tokens, prompt {args.prompt}" if "fixed" in sections else ""
    )
    print(f"\n| measurement ({args.device}{shapes}) | ptlab | reference | ratio |")
    print("|---|---|---|---|")
    for row in bench.rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nJSON: {args.out}/bench-{args.device}-{stamp}.json", file=sys.stderr)


if __name__ == "__main__":
    main()

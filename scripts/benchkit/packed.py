"""Packed sweeps: K runs trained packed over one backbone vs the same K runs one after another."""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from benchkit.backbones import PACK_BACKBONES
from benchkit.common import Bench, default_config, matmul_flops_per_s
from ptlab.config.compose import compose
from ptlab.config.schema import to_object

if TYPE_CHECKING:
    from omegaconf import DictConfig

# the runs of a packed sweep alternate these (10x and 1x the default AdamW lr), so they differ;
# (0.3 is the Adafactor recipe's lr; with AdamW a diverging run would fail its row: not worth the risk)
PACK_LRS = (0.03, 0.003)
# what the JSON keeps of each run of a packed sweep (summary.json, and run_outcome's loss)
RUN_KEYS = (
    "train_seconds",
    "examples_per_s",
    "peak_memory_mb",
    "load_seconds",
    "wall_seconds",
    "last_train_loss",
)


def sweep_config(overrides: list[str]) -> DictConfig:
    """A job's config as a sweep launcher gets it (tests/conftest.py's `compose_config`): composed
    with the hydra node set, so `${hydra:...}` would resolve, then without it (no logger)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    cfg = compose(["logger=none", *overrides], with_hydra=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def sweep_overrides(
    bench: Bench, name: str, size: int, batch: int, steps: int | None = None
) -> list[list[str]]:
    """The overrides of a sweep's first `size` runs: PT-20 on SST-2 with backbone `name`, seeds
    0..size-1, the lr alternating over `PACK_LRS`, a fixed horizon of `--pack-steps` (`steps`) with
    one evaluation and one loss record at its end, dropout off (so packed runs equal their runs
    alone), no resume. `data.cache_tokenized=false`: every run tokenizes its own rows in both arms (packing does not
    share tokenization), so neither arm reads a token cache that the other, or an earlier row,
    wrote: the order of the arms cannot favour one."""
    args = bench.args
    steps = steps or args.pack_steps
    common = [
        *PACK_BACKBONES[name],
        "hardware=gpu" if bench.device.type == "cuda" else "hardware=cpu",
        "method=prompt_tuning",
        "method.prompt_length=20",
        "backbone.dropout=false",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
        f"trainer.log_every={steps}",  # one training-loss record, at the end (compared across arms)
        f"trainer.batch_size={batch}",
        "trainer.resume=false",
        f"data.max_train_examples={args.pack_train_examples}",
        f"data.max_eval_examples={args.pack_eval_examples}",
        "data.cache_tokenized=false",
        *([f"data.max_source_length={args.pack_source_length}"] if args.pack_source_length else []),
    ]
    return [[*common, f"seed={seed}", f"trainer.lr={PACK_LRS[seed % 2]}"] for seed in range(size)]


def settle(device: torch.device) -> None:
    """Between arms: the previous arm's models freed, so neither counts the other's memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_outcome(run_dir: Path) -> dict:
    """A finished run's summary.json, plus its last logged training loss (metrics.jsonl)."""
    from ptlab.training.run_folder import read_summary

    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [event["loss"] for event in events if event["split"] == "train"]
    return {**read_summary(run_dir), "last_train_loss": losses[-1] if losses else None}


def sweep_alone(overrides: list[list[str]], root: Path) -> tuple:
    """(wall seconds, best values, run outcomes) of the runs trained one after another, each by
    `job.run` (its own backbone load, tokenization, training, evaluation, checkpoints)."""
    from ptlab.training.job import run

    cfgs = [sweep_config(o) for o in overrides]  # composing is the launcher's work in both arms: untimed
    started = time.perf_counter()
    best = [run(cfg, run_dir=root / str(i)) for i, cfg in enumerate(cfgs)]
    wall = time.perf_counter() - started
    return wall, best, [run_outcome(root / str(i)) for i in range(len(cfgs))]


def sweep_packed(overrides: list[list[str]], root: Path, pack_size: int) -> tuple:
    """(wall seconds, best values, run outcomes) of the same runs trained in packs of `pack_size`
    over one backbone loaded once (`run_jobs`), each run in its own folder."""
    from ptlab.training.job import Job, run_jobs
    from ptlab.training.run_folder import RunFacts

    cfgs = [sweep_config(o) for o in overrides]
    jobs = [Job(cfg, to_object(cfg), RunFacts(run_dir=root / str(i))) for i, cfg in enumerate(cfgs)]
    started = time.perf_counter()
    best = run_jobs(jobs, pack_size=pack_size)
    wall = time.perf_counter() - started
    return wall, best, [run_outcome(root / str(i)) for i in range(len(cfgs))]


def trained_examples(summary: dict) -> float:
    """Examples a run trained on: its examples/s times its training seconds (summary.json)."""
    return summary["examples_per_s"] * summary["train_seconds"]


def sweep_rates(summaries: list, pack_size: int) -> tuple:
    """(training examples/s of the sweep, peak memory MiB) from its runs' summaries, for runs in
    packs of `pack_size` (1: one after another).

    Alone, a run's train_seconds is its own training time, so the sweep's rate is all examples over
    the sum of the runs' train_seconds. In a pack every member's train_seconds counts the packed
    steps it took part in, i.e. the pack's shared time, not its share: summing them would count the
    pack's time once per member. A pack's training time is therefore the max over its members
    (the member that took part in every step; here all do, same horizon), summed over the packs:
    the sweep's rate is all examples over that. Peak memory is the max of the runs' (alone: the
    largest run; packed: each member's peak is the pack's since its training started)."""
    packs = [summaries[i : i + pack_size] for i in range(0, len(summaries), pack_size)]
    seconds = sum(max(s["train_seconds"] for s in pack) for pack in packs)
    examples = sum(trained_examples(s) for s in summaries)
    return examples / max(seconds, 1e-9), max(s["peak_memory_mb"] for s in summaries)


def packed_table_rows(bench: Bench, what: str, measured: dict, floor: float) -> None:
    """The table's rows of one packed sweep (`what`): wall time, examples/s, share of the matmul
    `floor` and peak memory, packed vs one after another."""
    alone, packed = measured["alone"], measured["packed"]
    bench.row(
        f"{what}, wall s (load + tokenize + train + eval), packed vs one after another",
        f"{packed['wall_s']:.1f} s",
        f"{alone['wall_s']:.1f} s",
        f"{alone['wall_s'] / packed['wall_s']:.2f}x faster",
    )
    bench.row(
        f"{what}, training examples/s, packed vs one after another",
        f"{packed['examples_per_s']:.0f}",
        f"{alone['examples_per_s']:.0f}",
        f"{packed['examples_per_s'] / alone['examples_per_s']:.2f}x",
    )
    bench.row(
        f"{what}, training FLOPs/s as a share of the matmul floor ({floor / 1e12:.2f} TFLOP/s), packed vs one after another",
        f"{packed['floor_share']:.1%}",
        f"{alone['floor_share']:.1%}",
        f"{packed['floor_share'] / alone['floor_share']:.2f}x",
    )
    bench.row(
        f"{what}, peak memory, the pack vs its largest run alone",
        f"{packed['peak_memory_mb']:.0f} MiB",
        f"{alone['peak_memory_mb']:.0f} MiB",
        f"{packed['peak_memory_mb'] / alone['peak_memory_mb']:.2f}x",
    )


def packed_row(bench: Bench, name: str, size: int, batch: int, scratch: Path, floor: float) -> dict:
    """One sweep of `size` runs, packed (`pack_size=size`) vs one after another, `--pack-repeats`
    times in this process, the arms alternating (A B B A ...): median wall times, the sweep's
    training examples/s, its training FLOPs/s as a share of the matmul `floor`, and peak memory
    (from the last repeat), each run's best value in both."""
    args = bench.args
    overrides = sweep_overrides(bench, name, size, batch)
    walls: dict = {"alone": [], "packed": []}
    last: dict = {}
    for repeat in range(args.pack_repeats):
        order = ("alone", "packed") if repeat % 2 == 0 else ("packed", "alone")
        for arm in order:
            settle(bench.device)
            root = scratch / f"{name}-k{size}-b{batch}-{repeat}-{arm}"
            if arm == "alone":
                wall, best, summaries = sweep_alone(overrides, root)
            else:
                wall, best, summaries = sweep_packed(overrides, root, size)
            if None in best:  # ptlab printed the failed run's one-line error
                raise RuntimeError(f"{name}: a run of the {arm} sweep of K={size}, batch {batch} failed")
            walls[arm].append(wall)
            last[arm] = (best, summaries)
    measured = {}
    for arm, pack_size in (("alone", 1), ("packed", size)):
        best, summaries = last[arm]
        rate, memory = sweep_rates(summaries, pack_size)
        flops_per_s = (
            rate
            * sum(run["train_flops"] for run in summaries)
            / sum(trained_examples(run) for run in summaries)
        )
        measured[arm] = {
            "floor_share": flops_per_s / floor,
            "wall_s": statistics.median(walls[arm]),
            "wall_s_all": walls[arm],
            "examples_per_s": rate,
            "peak_memory_mb": memory,
            "best": best,
            "runs": [{key: s[key] for key in RUN_KEYS} for s in summaries],
        }
    alone, packed = measured["alone"], measured["packed"]
    measured["best_max_difference"] = max(abs(a - b) for a, b in zip(alone["best"], packed["best"]))
    measured["loss_max_relative_difference"] = max(
        abs(a["last_train_loss"] - b["last_train_loss"]) / max(abs(b["last_train_loss"]), 1e-12)
        for a, b in zip(packed["runs"], alone["runs"])
    )
    what = f"{name}: sweep of K={size} PT-20 runs ({args.pack_steps} steps, batch {batch})"
    packed_table_rows(bench, what, measured, floor)
    return measured


def warm_up(bench: Bench, name: str, scratch: Path) -> None:
    """One short run alone before any timing: the process's first-use costs (imports of the model
    classes, a GGUF's dequantization into the cache, CUDA's context and kernels) fall on neither arm."""
    from ptlab.training.job import run

    (overrides,) = sweep_overrides(bench, name, 1, bench.args.batch, steps=1)
    run(sweep_config(overrides), run_dir=scratch / f"{name}-warm-up")
    settle(bench.device)


SHORT_HORIZON = (
    10  # steps over which a packed run equals its run alone within 1e-5 (tests/test_packed_sweeps.py)
)


def packed_verdict(difference: float, steps: int, device: str) -> str:
    """Equal within 1e-5; else why not: bf16, or rounding that the batch's shape changes and
    `steps` of training amplify (README, "Packed sweeps"); DIFFER only where nothing explains it."""
    if difference <= 1e-5:
        return "equal within 1e-5"
    if device == "cuda":
        return "differ (bf16 autocast)"
    if steps > SHORT_HORIZON:
        return f"differ: rounding amplified over {steps} steps (equal within 1e-5 up to {SHORT_HORIZON})"
    return "DIFFER"


def packed_sweep(bench: Bench) -> None:
    """Packed sweeps: for each `--pack-backbones` backbone and each K of `--pack-sizes`, the same K
    PT-20 runs (`sweep_overrides`) trained one after another with `job.run` vs packed with
    `run_jobs(..., pack_size=K)`, in this process: whole-sweep wall time, the sweep's training
    examples/s, peak memory (the pack vs its largest run alone) and whether every run's best
    validation value is the same in both (dropout off: equal within 1e-5). Rows at `--batch`, plus
    one at the realistic `--pack-batch` (default: the config's trainer.batch_size) for the largest K."""
    import tempfile

    args = bench.args
    batch_sizes = [(size, args.batch) for size in args.pack_sizes]
    realistic = args.pack_batch
    if realistic is None:  # the config's default batch size
        realistic = to_object(default_config([])).trainer.batch_size
    if realistic and realistic != args.batch:
        batch_sizes.append((max(args.pack_sizes), realistic))
    results = bench.results["packed_sweep"] = {}
    floor = matmul_flops_per_s(bench.device, bench.sync, args.repeats)
    with tempfile.TemporaryDirectory(prefix="ptlab-bench-packed-") as folder:
        scratch = Path(folder)
        for name in args.pack_backbones:
            warm_up(bench, name, scratch)
            rows = results[name] = {}
            for size, batch in batch_sizes:
                rows[f"k{size}_batch{batch}"] = packed_row(bench, name, size, batch, scratch, floor)
            difference = max(row["best_max_difference"] for row in rows.values())
            loss = max(row["loss_max_relative_difference"] for row in rows.values())
            runs = sum(len(row["packed"]["best"]) for row in rows.values())
            bench.row(
                f"{name}: each run packed vs alone, max difference over {runs} runs: best validation; "
                "last training loss (relative)",
                f"{difference:.1e}",
                f"{loss:.1e}",
                packed_verdict(max(difference, loss), args.pack_steps, bench.device.type),
            )

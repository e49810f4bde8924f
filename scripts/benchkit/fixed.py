"""The fixed-shape section: per backbone, ptlab vs PEFT, compiled vs eager, rank vs generate, and more."""

from __future__ import annotations

import copy
import time

from benchkit.common import Bench, matmul_flops_per_s, matmul_share, sharing, step_memory_mb
from benchkit.contenders import Setup, setup_backbone
from benchkit.methods import fpt_stages, methods_vs_pt100
from ptlab.model.compile import compile_blocks


def bench_backbone(bench: Bench, name: str) -> None:
    """All comparisons on one backbone: rows into `bench.rows`, measurements into `bench.results[name]`."""
    setup = setup_backbone(bench, name)
    bench.results[name] = {}
    train_vs_peft(bench, setup)
    if bench.args.compile:
        compile_vs_eager(bench, setup)
    rank_vs_generate(bench, setup)
    if setup.backbone.family == "causal":
        prompt_sharing(bench, setup)
    methods_vs_pt100(bench, setup)
    fpt_stages(bench, setup)


def train_vs_peft(bench: Bench, setup: Setup) -> None:
    """Training steps, ptlab vs PEFT: throughput, share of the matmul floor, peak memory and, on
    CPU, the share of time in matmul/attention kernels."""
    args, device, name = bench.args, bench.device, setup.name
    setup.backbone.train(), setup.method.train(), setup.peft.train()
    setup.backbone.model.eval()  # dropout off on both sides
    floor = matmul_flops_per_s(device, bench.sync, args.repeats)  # just before, under the same conditions
    train = bench.interleaved({"ptlab": setup.ours_step, "peft": setup.peft_step})
    examples_s = {k: args.batch / v for k, v in train.items()}
    bench.row(
        f"{name}: train step, examples/s",
        f"{examples_s['ptlab']:.1f}",
        f"{examples_s['peft']:.1f}",
        f"{examples_s['ptlab'] / examples_s['peft']:.2f}x",
    )
    bench.row(
        f"{name}: train step, share of the matmul floor ({floor / 1e12:.2f} TFLOP/s)",
        f"{setup.step_flops / train['ptlab'] / floor:.0%}",
        f"{setup.step_flops / train['peft'] / floor:.0%}",
    )
    memory = {
        "ptlab": step_memory_mb(setup.ours_step, device),
        "peft": step_memory_mb(setup.peft_step, device),
    }
    bench.row(
        f"{name}: train step, peak memory over the loaded model",
        f"{memory['ptlab']:.0f} MiB",
        f"{memory['peft']:.0f} MiB",
        f"{memory['ptlab'] / memory['peft']:.2f}x",
    )
    if device.type == "cpu":
        shares = {"ptlab": matmul_share(setup.ours_step), "peft": matmul_share(setup.peft_step)}
        bench.row(
            f"{name}: train step, time in matmul/attention kernels (profiler)",
            f"{shares['ptlab']:.0%}",
            f"{shares['peft']:.0%}",
        )
    bench.results[name].update(
        train_s=train, step_flops=setup.step_flops, step_memory_mb=memory, matmul_flops_per_s=floor
    )


def compile_vs_eager(bench: Bench, setup: Setup) -> None:
    """ptlab's training step with trainer.compile=true (every transformer block through
    torch.compile, on a copy of the backbone) vs eager."""
    compiled = copy.deepcopy(setup.backbone)
    compile_blocks(compiled.model)
    compiled_step = setup.step_on(compiled)
    started = time.perf_counter()
    compiled_step()
    compile_s = time.perf_counter() - started
    timing = bench.interleaved({"compiled": compiled_step, "eager": setup.ours_step})
    bench.row(
        f"{setup.name}: train step, trainer.compile=true vs eager (first step {compile_s:.0f} s)",
        f"{timing['compiled'] * 1000:.0f} ms",
        f"{timing['eager'] * 1000:.0f} ms",
        f"{timing['eager'] / timing['compiled']:.2f}x",
    )


def rank_vs_generate(bench: Bench, setup: Setup) -> None:
    """Evaluation: ptlab's rank classification in one pass vs PEFT generate + exact match."""
    evaluation = bench.interleaved({"ptlab": setup.ours_eval, "peft": setup.peft_eval})
    bench.row(
        f"{setup.name}: eval, examples/s (rank vs generate)",
        f"{bench.args.batch / evaluation['ptlab']:.1f}",
        f"{bench.args.batch / evaluation['peft']:.1f}",
        f"{evaluation['peft'] / evaluation['ptlab']:.2f}x",
    )
    bench.results[setup.name]["eval_s"] = evaluation


def prompt_sharing(bench: Bench, setup: Setup) -> None:
    """A causal backbone's shared prompt keys/values: computed once per batch vs per example."""
    for label, fn in (("train step", setup.ours_step), ("eval", setup.ours_eval)):
        timing = bench.interleaved(
            {"shared": sharing(setup.backbone, True, fn), "per_example": sharing(setup.backbone, False, fn)}
        )
        bench.results[setup.name][f"prompt_sharing_{label}_s"] = timing
        bench.row(
            f"{setup.name}: {label}, prompt states shared vs per example",
            f"{timing['shared'] * 1000:.0f} ms",
            f"{timing['per_example'] * 1000:.0f} ms",
            f"{timing['per_example'] / timing['shared']:.2f}x faster",
        )

"""The methods' training steps vs prompt tuning with 100 tokens, and FPT's stages vs the full model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from benchkit.backbones import BACKBONES
from benchkit.common import Bench, default_config, step_memory_mb, train_step
from benchkit.contenders import Setup
from ptlab.config.schema import to_object
from ptlab.methods import build_method
from ptlab.model.flops import BatchSizes
from ptlab.model.partial import PartialModel

if TYPE_CHECKING:
    from ptlab.methods.base import PromptMethod
    from ptlab.model.backbone import Backbone
    from ptlab.model.readout import TaskReadout

# the methods timed against each other: prompt tuning at four lengths and the other methods
METHODS = [
    ("pt5", ["method.prompt_length=5"]),
    ("pt20", ["method.prompt_length=20"]),
    ("pt50", ["method.prompt_length=50"]),
    ("pt100", ["method.prompt_length=100"]),
    ("smop4x5", ["method=smop"]),
    ("superpos", ["method=superpos"]),
    ("residual", ["method=residual"]),
    ("deep_prompt", ["method=deep_prompt"]),
]


def method_for(backbone: Backbone, readout: TaskReadout, overrides: list[str]) -> PromptMethod:
    """The method `overrides` configure, on a backbone already built (no second model load)."""
    config = to_object(default_config(overrides))
    return build_method(config.method, backbone.prompt_context(readout, config.seed))


def method_steps(bench: Bench, setup: Setup) -> dict:
    """A training step (own AdamW) of each of `METHODS` on the backbone and batch of `setup`."""
    steps = {}
    for label, extra in METHODS:
        other = method_for(setup.backbone, setup.readout, [*BACKBONES[setup.name], *extra])
        other.to(bench.device).train()
        opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
        steps[label] = lambda other=other, opt=opt: train_step(
            other, setup.backbone, setup.readout, setup.batch, opt, bench.autocast
        )
    return steps


def methods_vs_pt100(bench: Bench, setup: Setup) -> None:
    """Prompt length scaling and the methods' costs against prompt tuning with 100 (or 20) tokens."""
    name, steps = setup.name, method_steps(bench, setup)
    scaling = bench.interleaved(steps)
    memory = {label: step_memory_mb(steps[label], bench.device) for label in ("smop4x5", "pt100")}
    bench.results[name].update(methods_s=scaling, methods_memory_mb=memory)
    for label in ("pt5", "pt20", "pt50"):
        bench.row(
            f"{name}: train step {label} vs pt100",
            f"{scaling[label] * 1000:.0f} ms",
            f"{scaling['pt100'] * 1000:.0f} ms",
            f"{scaling['pt100'] / scaling[label]:.2f}x faster",
        )
    bench.row(
        f"{name}: SMoP 4x5 vs PT-100 time",
        f"{scaling['smop4x5'] * 1000:.0f} ms",
        f"{scaling['pt100'] * 1000:.0f} ms",
        f"{1 - scaling['smop4x5'] / scaling['pt100']:.1%} less (paper: 14.6%)",
    )
    bench.row(
        f"{name}: SMoP 4x5 vs PT-100 peak memory over the loaded model",
        f"{memory['smop4x5']:.0f} MiB",
        f"{memory['pt100']:.0f} MiB",
        f"{1 - memory['smop4x5'] / memory['pt100']:.1%} less (paper: 22.9%)",
    )
    for label in ("superpos", "residual"):
        bench.row(
            f"{name}: {label} vs PT (10 vs 20 tok)",
            f"{scaling[label] * 1000:.0f} ms",
            f"{scaling['pt20'] * 1000:.0f} ms",
            f"{scaling[label] / scaling['pt20']:.2f}x",
        )
    bench.row(
        f"{name}: deep_prompt vs PT-20 time (20 positions per layer vs 20 input tokens)",
        f"{scaling['deep_prompt'] * 1000:.0f} ms",
        f"{scaling['pt20'] * 1000:.0f} ms",
        f"{scaling['deep_prompt'] / scaling['pt20']:.2f}x",
    )


def fpt_stages(bench: Bench, setup: Setup) -> None:
    """FPT: each compound stage's training step time and FLOPs against the full model."""
    args, backbone, batch = bench.args, setup.backbone, setup.batch
    partial = PartialModel(backbone.model)
    with torch.no_grad(), backbone.per_example_prompt_states():
        partial.score_neurons(lambda: iter([backbone.output_logits(setup.readout, setup.method, batch)]))
    stage_times, stage_flops = {}, {}
    for depth in (0.25, 0.5, 0.75, 1.0):
        partial.set_stage(depth, depth)
        stage_times[depth] = bench.interleaved({"step": setup.ours_step})["step"]
        shape = setup.shape
        layers, neurons = len(partial.kept_layers[0]), partial.kept_neurons
        kept = shape.shrunk(layers, shape.decoder_layers, neurons, shape.decoder_ffn)
        stage_flops[depth] = backbone.train_step_flops(
            kept, BatchSizes(args.batch, args.seq_len + args.prompt, batch["target_ids"].shape[1])
        )
    partial.restore()
    bench.results[setup.name].update(fpt_stage_s=stage_times, fpt_stage_flops=stage_flops)
    for depth in (0.25, 0.5, 0.75):
        bench.row(
            f"{setup.name}: FPT stage depth=width={depth} vs full",
            f"{stage_times[depth] * 1000:.0f} ms",
            f"{stage_times[1.0] * 1000:.0f} ms",
            f"time {stage_times[depth] / stage_times[1.0]:.2f}, FLOPs {stage_flops[depth] / stage_flops[1.0]:.2f}",
        )

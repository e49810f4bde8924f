"""What bench.py's measurements share: configs as `ptlab-train` builds them, timing, memory, `Bench`."""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from peft import PromptTuningConfig, TaskType, get_peft_model

import ptlab
from ptlab.config.compose import compose
from ptlab.training.loop import backward_loss
from ptlab.training.memory import peak_memory_mb, proc_status_kb, reset_peak_memory

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from peft import PeftModel

    from ptlab.config.schema import Config
    from ptlab.data.examples import Example
    from ptlab.methods.base import PromptMethod
    from ptlab.model.backbone import Backbone
    from ptlab.model.readout import TaskReadout
    from ptlab.training.build import Pipeline


def default_config(overrides: list[str]) -> DictConfig:
    """The composed config `ptlab-train` would run with these overrides (no logger)."""
    return compose(["logger=none", *overrides])


def build(overrides: list[str], seq_len: int | None = None, splits: tuple = ()) -> Pipeline:
    """Config, backbone (dropout off) and method, as `ptlab-train` builds them, and the tokenized
    `splits`; `seq_len` overrides data.max_source_length."""
    length = [] if seq_len is None else [f"data.max_source_length={seq_len}"]
    return ptlab.build(default_config([*overrides, "backbone.dropout=false", *length]), splits=splits)


def real_task(
    overrides: list[str], split: str, device: torch.device
) -> tuple[Config, Backbone, TaskReadout, PromptMethod, list[Example]]:
    """Config, backbone, readout and method on `device`, and the tokenized rows of one real SST-2 split."""
    pipeline = build(overrides, splits=(split,))
    pipeline.backbone.to(device), pipeline.readout.to(device), pipeline.method.to(device)
    return pipeline.config, pipeline.backbone, pipeline.readout, pipeline.method, pipeline.data[split]


def train_step(
    method: PromptMethod,
    backbone: Backbone,
    readout: TaskReadout,
    batch: dict,
    optimizer: torch.optim.Optimizer,
    autocast: Callable[[], AbstractContextManager],
) -> None:
    """ptlab's training step: the Trainer's loss and backward (`backward_loss`), then the update."""
    backward_loss(method, backbone, readout, batch, autocast)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sharing(backbone: Backbone, share: bool, fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` run with a causal backbone's prompt-state sharing forced on or off (not auto)."""

    def call():
        previous, backbone.config.share_prompt_states = backbone.config.share_prompt_states, share
        try:
            return fn()
        finally:
            backbone.config.share_prompt_states = previous

    return call


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Seconds of one call of `fn`, synced before and after."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(contenders: dict, repeats: int, sync: Callable[[], None]) -> dict:
    """Median seconds per call of each contender, run A B A B after one warm-up call each."""
    for fn in contenders.values():
        fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(timed(fn, sync))
    return {name: statistics.median(values) for name, values in times.items()}


def peft_for(backbone: Backbone, method: PromptMethod, num_tokens: int) -> PeftModel:
    """PEFT prompt tuning with `num_tokens` virtual tokens on the backbone's model."""
    task = TaskType.SEQ_2_SEQ_LM if backbone.family == "seq2seq" else TaskType.CAUSAL_LM
    model = get_peft_model(backbone.model, PromptTuningConfig(task_type=task, num_virtual_tokens=num_tokens))
    return model


def step_memory_mb(fn: Callable[[], Any], device: torch.device, calls: int = 2) -> float:
    """Peak memory a call adds on top of what is already live (activations, gradients, optimizer
    state): CUDA max allocated; on CPU the RSS high-water mark, reset through /proc/self/clear_refs
    after `malloc_trim` hands freed heap pages back, so reused memory counts again when touched."""
    gc.collect()
    reset_peak_memory(device)
    base = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else proc_status_kb("VmRSS") / 1024
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return peak_memory_mb(device) - base


def matmul_share(fn: Callable[[], Any]) -> float:
    """Share of a call's operator self time spent in matrix multiplies and attention kernels (torch profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    matmul = sum(
        event.self_cpu_time_total
        for event in events
        if event.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
        or "scaled_dot_product" in event.key
    )
    return matmul / max(total, 1)


def matmul_flops_per_s(device: torch.device, sync: Callable[[], None], repeats: int) -> float:
    """The hardware floor: a large matmul's throughput, measured in this process."""
    size = 4096 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / interleaved({"mm": lambda: a @ a}, max(repeats, 10), sync)["mm"]


@dataclass
class Bench:
    """What every comparison shares: the options, the device's sync and autocast, and the output:
    table rows (label, ptlab, reference, ratio) and the JSON results."""

    args: argparse.Namespace
    device: torch.device
    sync: Callable[[], None]
    autocast: Callable
    rows: list = field(default_factory=list)
    results: dict = field(default_factory=dict)

    def row(self, label: str, ours: str, reference: str, ratio: str = "") -> None:
        self.rows.append((label, ours, reference, ratio))

    def interleaved(self, contenders: dict) -> dict:
        """`interleaved` with this run's repeats and sync."""
        return interleaved(contenders, self.args.repeats, self.sync)

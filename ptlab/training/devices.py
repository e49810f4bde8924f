"""Where a run's tensors live: its device (this rank's GPU, or the CPU), the autocast it computes
under, and batches moved there. Training, evaluation, the tools and the benchmarks all move through
these three."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Dict

import torch

from ptlab.config.schema import HardwareConfig
from ptlab.ranks import Ranks


def run_device(hardware: HardwareConfig, ranks: Ranks) -> torch.device:
    """This rank's GPU on CUDA (`cuda:<local rank>`), else the CPU."""
    return torch.device(f"cuda:{ranks.local_rank}" if hardware.device == "cuda" else "cpu")


def run_autocast(hardware: HardwareConfig) -> ContextManager:
    """bf16 autocast on CUDA when `hardware.precision=bf16` (the prompt itself stays fp32)."""
    if hardware.precision == "bf16" and hardware.device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}

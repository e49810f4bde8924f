"""One run on several processes (`torchrun --nproc_per_node=N -m ptlab.cli.train hardware=multi_gpu`).

Every rank holds the frozen backbone and the same prompt; each step splits the global batch
(`trainer.batch_size`, the same number whatever the world size) across ranks, weights each
rank's loss by its share of the batch and sums the gradients with one all-reduce, so N ranks take
exactly the step one process would. (That all-reduce is what DistributedDataParallel does; with a
few thousand trainable parameters its bucketing and overlap buy nothing.) Evaluation is sharded
and the predictions gathered. Only rank 0 logs, writes checkpoints and talks to W&B.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist

from ptlab.config.schema import HardwareConfig
from ptlab.errors import ConfigError
from ptlab.ranks import Ranks, launched_ranks


@dataclass(frozen=True)
class World(Ranks):
    """This process's ranks and the collectives every rank calls alike."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: List[Any]) -> List[Any]:
        """This rank's share of `items`: every size-th item from its rank on."""
        return items[self.rank :: self.size]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def sum_gradients(self, params: List[torch.Tensor]) -> None:
        """Sum every rank's gradients in one all-reduce (what DDP does; its bucketing buys nothing
        for kilo-parameter prompts). A parameter this rank did not touch contributes zeros."""
        if self.size == 1:
            return
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        grads = self.sum_(torch.cat([param.grad.flatten() for param in params]))
        offset = 0
        for param in params:
            param.grad.copy_(grads[offset : offset + param.numel()].view_as(param))
            offset += param.numel()

    def gather(self, values: List[Any]) -> List[List[Any]]:
        """Every rank's `values`, in rank order, on every rank."""
        if self.size == 1:
            return [values]
        gathered: List[Any] = [None] * self.size
        dist.all_gather_object(gathered, values)
        return gathered

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def launched_world() -> World:
    """The ranks this process was launched with (`ptlab.ranks`), as a world to train in."""
    return World(**vars(launched_ranks()))


def init_world(hardware: HardwareConfig) -> World:
    """Join the process group torchrun set up; a clear error if the launch and the config disagree."""
    world = launched_world()
    if hardware.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"hardware={hardware.name} needs CUDA, and no CUDA device is visible: use hardware=cpu"
        )
    if world.size > 1 and not hardware.distributed:
        raise ConfigError(
            f"launched with {world.size} processes but hardware={hardware.name} is single-process: "
            "use hardware=multi_gpu (or hardware.distributed=true)"
        )
    if world.size == 1:
        return world
    if "RANK" not in os.environ:  # a submitit job: publish what env:// initialisation reads, as torchrun does
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if hardware.device == "cuda":
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if hardware.device == "cuda" else "gloo")
    return world


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()

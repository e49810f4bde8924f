"""Which rank of which launch this process is, read from the environment alone: the run folder's
name (`config/compose.run_stamp`) needs it before anything is composed, and the training world
(`training/distributed.World`) starts from it."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    size: int = 1
    local_rank: int = 0


def launched_ranks() -> Ranks:
    """torchrun's environment, else a submitit job's tasks (`hydra.launcher.tasks_per_node=N`),
    else one process."""
    if "RANK" in os.environ:
        return Ranks(
            int(os.environ["RANK"]),
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
    if "SUBMITIT_EXECUTOR" in os.environ:
        from submitit import JobEnvironment

        job = JobEnvironment()
        return Ranks(job.global_rank, job.num_tasks, job.local_rank)
    return Ranks()

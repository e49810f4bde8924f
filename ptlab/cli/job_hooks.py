"""Hydra's per-job callbacks for jobs that Hydra's `run_job` does not run (`hydra/launcher=packed`
trains its jobs in packs, not one task call per job).

`hydra.core.utils.run_job` tells the sweep's callbacks `on_job_start(config, task_function)`
before a job's task runs and `on_job_end(config, job_return)` after; `JobHooks` does the same for
each packed job, with its own config and JobReturn, through the sweep's own `Callbacks` object
(`HydraContext.callbacks`), so every `hydra.callbacks` entry sees every job, as under the basic
launcher, and a callback that raises is a warning there as here.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import TaskFunction
from omegaconf import DictConfig

if TYPE_CHECKING:
    from hydra._internal.callbacks import Callbacks


@contextmanager
def hydra_config_of(config: DictConfig) -> Iterator[None]:
    """HydraConfig is the job's while its callbacks run (as in `run_job`), and what it was after."""
    before = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(config)
    try:
        yield
    finally:
        HydraConfig.instance().cfg = before


class JobHooks:
    """A sweep's jobs (numbered from 0 in launch order), each with its config (`hydra:` included)
    and the JobReturn the launcher hands back, and the callbacks to tell as each starts and ends."""

    def __init__(self, callbacks: Callbacks, task_function: Optional[TaskFunction]) -> None:
        self.callbacks, self.task_function = callbacks, task_function
        self.configs: List[DictConfig] = []
        self.returns: List[JobReturn] = []

    def add(self, config: DictConfig, job_return: JobReturn) -> None:
        self.configs.append(config)
        self.returns.append(job_return)

    def started(self, jobs: Sequence[int]) -> None:
        for job in jobs:
            with hydra_config_of(self.configs[job]):
                self.callbacks.on_job_start(config=self.configs[job], task_function=self.task_function)

    def ended(self, job: int, value: Optional[float]) -> None:
        """A job ended with its best validation value, None when it failed: its JobReturn is
        COMPLETED either way, as under the basic launcher (where ptlab's task returns None for a
        failed job, so an Optuna trial records a failure)."""
        job_return = self.returns[job]
        job_return.status, job_return.return_value = JobStatus.COMPLETED, value
        with hydra_config_of(self.configs[job]):
            self.callbacks.on_job_end(config=self.configs[job], job_return=job_return)

    def ended_if_untold(self, jobs: Sequence[int], values: Sequence[Optional[float]]) -> None:
        """`ended` for the `jobs` whose end was not told as it came (a group trained in a submitit
        job; a member a pack stopped without ending it): Hydra's sweepers read every job's status."""
        for job, value in zip(jobs, values):
            if self.returns[job].status == JobStatus.UNKNOWN:
                self.ended(job, value)

    def ender(self, jobs: Sequence[int]) -> Callable[[int, Optional[float]], None]:
        """`ended` for a group of `jobs`, which names them by their place in the group."""
        return lambda index, value: self.ended(jobs[index], value)

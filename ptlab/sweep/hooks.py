"""Hydra's per-job callbacks for jobs that Hydra's `run_job` does not run (`hydra/launcher=packed`
trains its jobs in packs, not one task call per job).

`hydra.core.utils.run_job` tells the sweep's callbacks `on_job_start(config, task_function)`
before a job's task runs and `on_job_end(config, job_return)` after; `JobHooks` does the same for
each packed job, with its own config and JobReturn, through the sweep's own `Callbacks` object
(`HydraContext.callbacks`), so every `hydra.callbacks` entry sees every job, as under the basic
launcher, and a callback that raises is a warning there as here.

At the end of a multirun, `FailedJobs`: the end of a multirun: a job that failed (a bad value, a non-finite loss, a data error) left a
`failure.json` with its one-line error (ptlab/training/run_folder.py), and the other jobs ran; this Hydra
callback names the failed jobs and makes the sweep exit non-zero. A job refused because another
process holds its folder (ptlab/training/folder_lock.py) writes nothing there; the callback sees it
end (in this process) without a value while another process's holder record is in its folder.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Set

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import TaskFunction
from omegaconf import DictConfig

from ptlab.training.folder_lock import Holder
from ptlab.training.run_folder import FAILURE_FILE, SUMMARY_FILE, read_json_record

if TYPE_CHECKING:
    from hydra._internal.callbacks import Callbacks


@contextmanager
def hydra_config_of(cfg: DictConfig) -> Iterator[None]:
    """HydraConfig is the job's while its callbacks run (as in `run_job`), and what it was after."""
    before = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        yield
    finally:
        HydraConfig.instance().cfg = before


class JobHooks:
    """A sweep's jobs (numbered from 0 in launch order), each with its config (`hydra:` included)
    and the JobReturn the launcher hands back, and the callbacks to tell as each starts and ends."""

    def __init__(self, callbacks: Callbacks, task_function: Optional[TaskFunction]) -> None:
        self.callbacks, self.task_function = callbacks, task_function
        self.cfgs: List[DictConfig] = []
        self.returns: List[JobReturn] = []
        self.begun: Set[int] = set()
        # jobs that stop at a successive-halving rung in this round: their end waits for the decision
        self.holding: Set[int] = set()

    def add(self, cfg: DictConfig, job_return: JobReturn) -> None:
        self.cfgs.append(cfg)
        self.returns.append(job_return)

    def started(self, jobs: Sequence[int]) -> None:
        """The `jobs` start (told once: a job of several halving rounds starts with the first)."""
        for job in [job for job in jobs if job not in self.begun]:
            self.begun.add(job)
            with hydra_config_of(self.cfgs[job]):
                self.callbacks.on_job_start(config=self.cfgs[job], task_function=self.task_function)

    def ended(self, job: int, value: Optional[float]) -> None:
        """A job ended with its best validation value, None when it failed: its JobReturn is
        COMPLETED either way, as under the basic launcher (where ptlab's task returns None for a
        failed job, so an Optuna trial records a failure). A job held at its rung is not ended
        here (unless it failed): the scheduler ends it if it goes no further."""
        if job in self.holding and value is not None:
            return
        job_return = self.returns[job]
        job_return.status, job_return.return_value = JobStatus.COMPLETED, value
        with hydra_config_of(self.cfgs[job]):
            self.callbacks.on_job_end(config=self.cfgs[job], job_return=job_return)

    def ended_if_untold(self, jobs: Sequence[int], values: Sequence[Optional[float]]) -> None:
        """`ended` for the `jobs` whose end was not told as it came (a group trained in a submitit
        job; a member a pack stopped without ending it): Hydra's sweepers read every job's status."""
        for job, value in zip(jobs, values):
            if self.returns[job].status == JobStatus.UNKNOWN:
                self.ended(job, value)

    def ender(self, jobs: Sequence[int]) -> Callable[[int, Optional[float]], None]:
        """`ended` for a group of `jobs`, which names them by their place in the group."""
        return lambda index, value: self.ended(jobs[index], value)


class FailedJobs(Callback):
    def __init__(self) -> None:
        self.ended: List[Path] = []  # the folders of the jobs that ended in this process
        self.refused: Dict[Path, Holder] = {}  # folder -> the other process that holds it

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        folder = Path(config.hydra.runtime.output_dir)
        self.ended.append(folder)
        holder = Holder.read(folder)
        unrun = job_return.status == JobStatus.COMPLETED and job_return.return_value is None
        if unrun and holder is not None and not holder.is_this_process() and not holder.died_here():
            self.refused[folder] = holder

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        jobs = max(len(list(sweep.glob(f"*/{SUMMARY_FILE}"))), len(self.ended))
        failures = {path.parent: read_json_record(path) for path in sorted(sweep.glob(f"*/{FAILURE_FILE}"))}
        failed = [
            f"job {folder.name} ({folder}): {(record or {}).get('error', 'unreadable failure record')}"
            for folder, record in failures.items()
            if folder not in self.refused  # a failure record there is its holder's run's
        ]
        failed += [
            f"job {folder.name} ({folder}): not run, its folder is held by pid {holder.pid} on host {holder.host}"
            for folder, holder in self.refused.items()
        ]
        if failed:
            print(f"ptlab: error: {len(failed)} of {jobs} jobs failed: " + "; ".join(failed), file=sys.stderr)
            sys.exit(1)

"""The end of a multirun: a job that failed (a bad value, a non-finite loss, a data error) left a
`failure.json` with its one-line error (ptlab/training/run_folder.py), and the other jobs ran; this Hydra
callback names the failed jobs and makes the sweep exit non-zero. A job refused because another
process holds its folder (ptlab/training/folder_lock.py) writes nothing there; the callback sees it
end (in this process) without a value while another process's holder record is in its folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ptlab.training.folder_lock import Holder
from ptlab.training.run_folder import FAILURE_FILE, SUMMARY_FILE, read_json_record


class FailedJobs(Callback):
    def __init__(self) -> None:
        self.ended: List[Path] = []  # the folders of the jobs that ended in this process
        self.refused: Dict[Path, Holder] = {}  # folder -> the other process that holds it

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        folder = Path(config.hydra.runtime.output_dir)
        self.ended.append(folder)
        holder = Holder.read(folder)
        unrun = job_return.status == JobStatus.COMPLETED and job_return.return_value is None
        if unrun and holder is not None and not holder.is_this_process():
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

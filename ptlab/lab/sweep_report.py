"""The end of a multirun: a job that failed (a bad value, a non-finite loss, a data error) left a
`failure.json` with its one-line error (ptlab/training/run_folder.py), and the other jobs ran; this Hydra
callback names the failed jobs and makes the sweep exit non-zero."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ptlab.training.run_folder import FAILURE_FILE, SUMMARY_FILE, read_json_record


class FailedJobs(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        jobs = len(list(sweep.glob(f"*/{SUMMARY_FILE}")))
        failures = {path.parent: read_json_record(path) for path in sorted(sweep.glob(f"*/{FAILURE_FILE}"))}
        failed = [
            f"job {folder.name} ({folder}): {(record or {}).get('error', 'unreadable failure record')}"
            for folder, record in failures.items()
        ]
        if failed:
            print(f"ptlab: error: {len(failed)} of {jobs} jobs failed: " + "; ".join(failed), file=sys.stderr)
            sys.exit(1)

"""The end of a multirun: a job that failed (a bad value, a non-finite loss, a data error) left a
`summary.json` with `status: failed` and its one-line error, and the other jobs ran; this Hydra
callback names the failed jobs and makes the sweep exit non-zero."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class FailedJobs(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summaries = sorted(Path(config.hydra.sweep.dir).glob("*/summary.json"))
        failed = []
        for path in summaries:
            summary = json.loads(path.read_text())
            if summary.get("status") == "failed":
                failed.append(f"job {path.parent.name} ({path.parent}): {summary['error']}")
        if failed:
            print(
                f"ptlab: error: {len(failed)} of {len(summaries)} jobs failed: " + "; ".join(failed),
                file=sys.stderr,
            )
            sys.exit(1)

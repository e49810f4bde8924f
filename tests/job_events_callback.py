"""A user's Hydra callback for tests/test_job_callbacks.py: one JSON line per `on_job_start` and
`on_job_end` into the file that $PTLAB_TEST_JOB_EVENTS names."""

from __future__ import annotations

import json
import os
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def record(event: str, config: DictConfig, **facts: Any) -> None:
    line = {
        "event": event,
        "job": config.hydra.job.num,
        "hydra_config_job": HydraConfig.get().job.num,
        **facts,
    }
    with open(os.environ["PTLAB_TEST_JOB_EVENTS"], "a", encoding="utf-8") as events:
        events.write(json.dumps(line) + "\n")


class RecordJobEvents(Callback):
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        record("start", config, task_function=getattr(kwargs["task_function"], "__name__", None))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        record("end", config, status=job_return.status.name, value=job_return.return_value,
               folder=config.hydra.runtime.output_dir)  # fmt: skip

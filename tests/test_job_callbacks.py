"""Hydra's per-job callbacks see every job of a packed sweep as under Hydra's basic launcher: one
`on_job_start` and one `on_job_end` per job, with its config and its JobReturn (COMPLETED, its best
validation value; None for a job that failed), for a user's callback and Hydra's LogJobReturnCallback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import pytest
from test_scale_out import cli

from ptlab.training.run_folder import read_summary

from conftest import TINY

CALLBACKS = [
    "+hydra.callbacks.job_events._target_=tests.job_events_callback.RecordJobEvents",
    "+hydra.callbacks.log_job_return._target_=hydra.experimental.callbacks.LogJobReturnCallback",
]
# job 0 trains, job 1 fails (a non-finite loss), each in its own folder
SWEEP = [*TINY, "backbone=tiny_t5", "backbone.dropout=false", "trainer.max_steps=4", "trainer.eval_every=2",
         "trainer.lr=0.1,1e30", *CALLBACKS]  # fmt: skip


def swept(tmp_path: Path, name: str, *launcher: str) -> List[Dict]:
    """The callback's events of the sweep, checked against the jobs' folders and Hydra's log line."""
    events, sweep = tmp_path / f"{name}.jsonl", tmp_path / name
    result = cli(["-m", *launcher, f"hydra.sweep.dir={sweep}", *SWEEP], env_extra={"PTLAB_TEST_JOB_EVENTS": str(events)},
                 timeout=600)  # fmt: skip
    assert result.returncode == 1 and "1 of 2 jobs failed" in result.stderr, result.stderr[-3000:]
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    best = read_summary(sweep / "0")["best"]["acc"]
    for line in lines:
        assert line["job"] == line["hydra_config_job"]  # HydraConfig is the job's while its callbacks run
    starts = [line for line in lines if line["event"] == "start"]
    ends = {line["job"]: line for line in lines if line["event"] == "end"}
    assert sorted(line["job"] for line in starts) == [0, 1] and sorted(ends) == [0, 1]
    for job in (0, 1):  # each job starts before it ends
        assert lines.index(next(s for s in starts if s["job"] == job)) < lines.index(ends[job])
        assert ends[job]["folder"] == str(sweep / str(job))
    assert ends[0]["value"] == pytest.approx(best) and ends[1]["value"] is None
    assert f"Succeeded with return value: {ends[0]['value']}" in result.stdout  # LogJobReturnCallback
    assert "Succeeded with return value: None" in result.stdout
    return lines


def comparable(lines: List[Dict]) -> List[tuple]:
    return sorted((line["event"], line["job"], line.get("status"), line.get("value") is None,
                   line.get("task_function")) for line in lines)  # fmt: skip


def test_a_packed_sweeps_jobs_reach_hydras_callbacks_as_under_the_basic_launcher(tmp_path):
    packed = swept(tmp_path, "packed", "hydra/launcher=packed")
    basic = swept(tmp_path, "basic")
    assert comparable(packed) == comparable(basic)
    assert {line["status"] for line in packed if line["event"] == "end"} == {"COMPLETED"}
    assert {line["task_function"] for line in packed if line["event"] == "start"} == {"task"}

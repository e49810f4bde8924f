"""Successive halving as the packed launcher's scheduler (`hydra.launcher.halving`): rungs at
floor(max_steps / eta^(rungs - i)), the top 1/eta of each bracket's configurations promoted by the
mean of their seeds (ties: the lower validation loss, then job order), stopped runs recorded as
stopped and returned to Hydra with their rung's score, a promoted run equal to its run without the
scheduler, a rerun that reaches the same decisions and trains nothing, and the scheduler turned off
continuing the stopped runs. Real sweeps of a tiny T5 on SST-2 files, in one process and on
two worker processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from safetensors.torch import load_file
from test_scale_out import cli

from ptlab.config.schema import to_object
from ptlab.errors import ConfigError
from ptlab.sweep.halving import Bracket, Configuration, brackets, decide, rung_steps, settings_of
from ptlab.training.opened_run import Job
from ptlab.training.run_folder import RunFacts, read_summary

from conftest import OFFLINE_ENV, REPO, TINY, compose_config

# 2 brackets (methods) x 3 configurations (lrs) x 2 seeds; rungs at steps 3 and 9
BASE = [*TINY, "backbone=tiny_t5", "hardware.num_threads=1", "trainer.eval_every=9",
        "method=prompt_tuning,smop", "trainer.lr=0.3,0.03,0.003", "seed=0,1", "hydra.launcher.pack_size=12"]  # fmt: skip
HALVING = "hydra.launcher.halving={eta: 3, rungs: 2, within: [method], average: [seed]}"
EVENTS = "+hydra.callbacks.job_events._target_=tests.job_events_callback.RecordJobEvents"
JOBS = 12


def command(folder: Path, *extra: str) -> List[str]:
    steps = [] if any(item.startswith("trainer.max_steps=") for item in extra) else ["trainer.max_steps=9"]
    return ["-m", "hydra/launcher=packed", f"hydra.sweep.dir={folder}", *BASE, *steps, *extra]


def sweep(folder: Path, *extra: str, events: Path = None):
    env = {"PTLAB_TEST_JOB_EVENTS": str(events)} if events else None
    return cli(command(folder, *extra), env_extra=env, timeout=900)


def decisions(folder: Path) -> List[Dict]:
    return json.loads((folder / "halving.json").read_text(), parse_float=lambda x: round(float(x), 5))["decisions"]


def events_of(path: Path) -> List[Dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def validation_events(run_dir: Path) -> List[Dict]:
    return [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if e["split"] == "validation"]


def assert_same_run(ours: Path, theirs: Path) -> None:
    a, b = read_summary(ours), read_summary(theirs)
    assert a["status"] == b["status"] == "finished" and a["steps"] == b["steps"]
    assert a["best"] == pytest.approx(b["best"], abs=1e-5) and a["final"] == pytest.approx(b["final"], abs=1e-5)
    prompt, expected = (load_file(folder / "checkpoints/best/prompt.safetensors") for folder in (ours, theirs))
    for key in expected:
        torch.testing.assert_close(prompt[key], expected[key], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Every job trained to its end, the scheduler off: what a promoted run must equal."""
    folder = tmp_path_factory.mktemp("full") / "sweep"
    result = sweep(folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def halved(tmp_path_factory):
    root = tmp_path_factory.mktemp("halved")
    folder, events = root / "sweep", root / "events.jsonl"
    result = sweep(folder, HALVING, EVENTS, events=events)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, events, result


def test_rungs_are_at_max_steps_over_powers_of_eta():
    assert rung_steps(27, 3, 3) == [3, 9, 27]
    assert rung_steps(300, 3, 3) == [33, 100, 300]
    assert rung_steps(100, 2, 1) == [100]


def test_the_top_third_goes_on_by_mean_score_then_loss_then_job_order():
    bracket = Bracket((), [3, 9], [Configuration((f"lr={i}",), [2 * i, 2 * i + 1]) for i in range(7)])
    scores = {0: (0.5, 1.0), 1: (0.7, 1.0),  # mean 0.6, loss 1.0
              2: (0.6, 0.9), 3: (0.6, 0.9),  # mean 0.6, loss 0.9: beats the first on loss
              4: (0.9, 2.0), 5: None,  # one seed failed: ranked by the other, 0.9
              6: (0.6, 0.9), 7: (0.6, 0.9),  # ties the second in score and loss: job order
              8: None, 9: None}  # fmt: skip
    scores.update({i: (0.1, 1.0) for i in range(10, 14)})
    ranked = decide(bracket, 3, scores)
    assert [r.configuration.overrides[0] for r in ranked] == ["lr=2", "lr=1", "lr=3", "lr=0", "lr=5", "lr=6", "lr=4"]
    assert [r.promoted for r in ranked] == [True, True] + [False] * 5  # 7 // 3
    lone = decide(Bracket((), [3], [Configuration(("a",), [0]), Configuration(("b",), [1])]), 3, {0: (0.2, 1), 1: (0.3, 1)})
    assert [r.promoted for r in lone] == [True, False]  # at least one


def halving_jobs(*swept: str, **settings) -> None:
    """The scheduler's checks on the jobs of a sweep over `swept` (`key=v1,v2` items), in this process."""
    overrides = [[]]
    for item in ["backbone=tiny_t5", "trainer.max_steps=9", *swept]:
        name, values = item.split("=", 1)
        overrides = [[*o, f"{name}={value}"] for o in overrides for value in values.split(",")]
    jobs = []
    for items in overrides:
        cfg = compose_config([*TINY, *items])
        jobs.append(Job(cfg, to_object(cfg), RunFacts()))
    brackets(settings_of(settings), jobs, overrides)


@pytest.mark.parametrize(
    "settings, swept, message",
    [
        ({"eta": 1}, [], "hydra.launcher.halving.eta=1: give a whole number, 2 or more"),
        ({"rungs": 0}, [], "hydra.launcher.halving.rungs=0: give a whole number, 1 or more"),
        ({"etta": 3}, [], "hydra.launcher.halving.etta is not a setting of successive halving"),
        ({"metric": "f1"}, ["seed=0,1"], "hydra.launcher.halving.metric='f1': task sst2 reports acc"),
        ({"average": ["data.seed"]}, ["seed=0,1"], "hydra.launcher.halving.average: no override sets 'data.seed'"),
        ({"rungs": 4}, ["seed=0,1"], "rung 1 of 4 would be at step 0 of 9"),
        ({"within": ["trainer.lr"]}, ["trainer.lr=0.1,0.3", "trainer.max_steps=9,18"], "mixes trainer.max_steps [9, 18]"),
        ({"rungs": 2}, ["seed=0,1", "stages=fpt"], "rung step 3 falls inside a partial-model stage of stages=fpt"),
    ],
)  # fmt: skip
def test_bad_halving_settings_are_refused_before_anything_trains(settings, swept, message):
    with pytest.raises(ConfigError) as refused:
        halving_jobs(*swept, **settings)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_bad_halving_setting_is_one_line_from_the_command_line(tmp_path):
    result = sweep(tmp_path / "sweep", "hydra.launcher.halving={within: [method], average: [data.seed]}")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ptlab: error: hydra.launcher.halving.average: no override sets 'data.seed'"), last
    assert "trainable parameters" not in result.stdout


def test_each_bracket_keeps_its_best_configuration_and_stopped_runs_say_so(halved, full):
    folder, events, result = halved
    report = json.loads((folder / "halving.json").read_text())
    assert report["rung_steps"] == {"method=prompt_tuning": [3, 9], "method=smop": [3, 9]}
    (decision,) = report["decisions"]
    promoted = []
    for bracket in decision["brackets"]:
        assert bracket["step"] == 3 and len(bracket["configurations"]) == 3
        rows = bracket["configurations"]
        for row in rows:  # each configuration's score: the mean of its seeds' records at step 3
            seen = [[e for e in validation_events(folder / str(job)) if e["step"] == 3][-1] for job in row["jobs"]]
            assert row["score"] == pytest.approx(sum(e["acc"] for e in seen) / 2)
            assert row["loss"] == pytest.approx(sum(e["loss"] for e in seen) / 2)
        assert [(-r["score"], r["loss"], r["jobs"][0]) for r in rows] == sorted((-r["score"], r["loss"], r["jobs"][0]) for r in rows)
        assert [r["promoted"] for r in rows] == [True, False, False]
        promoted += rows[0]["jobs"]
    assert len(promoted) == 4
    returned = {e["job"]: e for e in events_of(events) if e["event"] == "end"}
    assert sorted(returned) == list(range(JOBS))
    assert sorted(e["job"] for e in events_of(events) if e["event"] == "start") == list(range(JOBS))
    for job in range(JOBS):
        summary = read_summary(folder / str(job))
        assert returned[job]["status"] == "COMPLETED"
        for event in validation_events(folder / str(job)):  # every validation event carries the loss
            assert event["loss"] > 0
        if job in promoted:  # it equals its run without the scheduler
            assert_same_run(folder / str(job), full / str(job))
            assert returned[job]["value"] == pytest.approx(summary["best"]["acc"])
        else:
            assert (summary["status"], summary["rung"], summary["rungs"], summary["steps"]) == ("stopped", 1, 2, 3)
            assert returned[job]["value"] == pytest.approx(summary["final"]["acc"])
    assert "halving: rung 1 of 2 (step 3), bracket method=smop: 1 of 3 configurations promoted (by acc)" in result.stdout
    assert result.stdout.count("loaded once") == 1  # one backbone load for both rounds


def test_on_two_workers_each_rung_is_a_round_of_packs_on_workers_that_keep_their_backbone(halved, tmp_path):
    folder, _, _ = halved
    ours = tmp_path / "sweep"
    result = sweep(ours, HALVING, "hydra.launcher.workers=2", "hydra.launcher.pack_size=6")
    assert result.returncode == 0, result.stderr[-3000:]
    assert decisions(ours) == decisions(folder)
    # rung 1's two packs load a backbone in each worker; rung 2's pack trains on one of them
    assert result.stdout.count("hydra.launcher.workers=2: ") == 2  # two rounds
    assert result.stdout.count("loaded once") == 2
    for job in range(JOBS):
        a, b = read_summary(ours / str(job)), read_summary(folder / str(job))
        assert (a["status"], a["steps"]) == (b["status"], b["steps"])
        assert a["final"] == pytest.approx(b["final"], abs=1e-5)


def test_a_driver_killed_in_rung_1_reruns_to_the_same_decisions_without_training_twice(halved, tmp_path):
    folder = tmp_path / "sweep"
    driver = subprocess.Popen([sys.executable, "-m", "ptlab.cli.train", *command(folder, HALVING)], cwd=REPO,
                              env={**os.environ, **OFFLINE_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    started = time.monotonic()
    while not any((read_summary(folder / str(job)) or {}).get("status") == "stopped" for job in range(JOBS)):
        assert driver.poll() is None and time.monotonic() - started < 600, "the sweep ended before a run stopped"
        time.sleep(0.02)
    driver.kill()  # kill -9, as the OOM killer would: its pack's runs were leaving at rung 1
    driver.wait()
    stopped = [job for job in range(JOBS) if (read_summary(folder / str(job)) or {}).get("status") == "stopped"]
    result = sweep(folder, HALVING)
    assert result.returncode == 0, result.stderr[-3000:]
    assert decisions(folder) == decisions(halved[0])
    for job in stopped:  # what had stopped before the kill is not trained again
        assert f"{folder / str(job)} already stopped at rung 1, step 3" in result.stdout
    for line in re.findall(r"resumed from .* at step (\d+)", result.stdout):
        assert int(line) >= 3  # the others resume from their rung's checkpoint, or further
    for job in range(JOBS):
        a, b = read_summary(folder / str(job)), read_summary(halved[0] / str(job))
        assert (a["status"], a["steps"]) == (b["status"], b["steps"]) and a["final"] == pytest.approx(b["final"], abs=1e-5)


def test_a_rerun_reaches_the_same_decisions_and_trains_nothing(halved, tmp_path):
    folder, _, _ = halved
    before = (folder / "halving.json").read_text()
    result = sweep(folder, HALVING)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (folder / "halving.json").read_text() == before
    assert result.stdout.count("already stopped at rung 1, step 3") == 8
    assert result.stdout.count("already finished") == 4 + 4  # the promoted, skipped in both rounds
    assert "training together" not in result.stdout and "resumed from" not in result.stdout


def test_the_scheduler_off_continues_the_stopped_runs_to_their_full_runs(halved, full, tmp_path):
    folder, _, _ = halved
    result = sweep(folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("resumed from") == 8 and result.stdout.count("already finished") == 4
    for job in range(JOBS):
        assert_same_run(folder / str(job), full / str(job))

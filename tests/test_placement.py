"""A packed sweep's packs placed on every device it is given, with real processes: this machine's
workers (`hydra.launcher.workers`), one submitit job per pack (submitit's local cluster), and a
real two-node Ray cluster (tests/ray_cluster_scenarios.py, inside a loopback-only network
namespace). Every member must end as the same sweep trained in one process; a lost node, a killed
driver and a folder another process holds must lose nothing and train nothing twice."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ray_cluster_scenarios import checkpoint_step
from safetensors.torch import load_file
from test_scale_out import cli

from ptlab.training.folder_lock import FolderLocks
from ptlab.training.run_folder import read_summary

from conftest import OFFLINE_ENV, REPO, TINY

# 8 jobs in 2 packs of 4; one thread in every arm, since the thread count changes rounding
SWEEP = [*TINY, "backbone=tiny_t5", "hardware.num_threads=1", "trainer.max_steps=9", "trainer.eval_every=3",
         "seed=0,1,2,3", "method=prompt_tuning,smop", "hydra.launcher.pack_size=4",
         "hydra.launcher.mix_widths=true"]  # fmt: skip (two widths in each pack: the option mixed packs need)
PACKS = [[0, 1, 2, 3], [4, 5, 6, 7]]


def sweep_command(sweep_dir: Path, *extra: str) -> list:
    return ["-m", "hydra/launcher=packed", f"hydra.sweep.dir={sweep_dir}", *SWEEP, *extra]


def packed(sweep_dir: Path, *extra: str):
    return cli(sweep_command(sweep_dir, *extra), timeout=900)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The sweep trained in one process, one pack after the other: what every placement must equal."""
    sweep = tmp_path_factory.mktemp("one_process") / "sweep"
    result = packed(sweep, "hydra.launcher.workers=1")
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep


def assert_members_equal(sweep: Path, reference: Path) -> None:
    for job in range(8):
        ours, theirs = read_summary(sweep / str(job)), read_summary(reference / str(job))
        assert ours["status"] == "finished", (job, ours)
        assert "trainable parameters" in (sweep / str(job) / "train.log").read_text()  # its own log, wherever it ran
        assert ours["best"] == pytest.approx(theirs["best"], abs=1e-5), job
        assert ours["final"] == pytest.approx(theirs["final"], abs=1e-5), job
        prompt, expected = (load_file(folder / str(job) / "checkpoints/best/prompt.safetensors")
                            for folder in (sweep, reference))  # fmt: skip
        assert prompt.keys() == expected.keys()
        for key in prompt:
            torch.testing.assert_close(prompt[key], expected[key], atol=1e-5, rtol=0)


def span(sweep: Path, jobs) -> tuple:
    """When a pack trained: its members' first record (their `.hydra/` snapshot) to their last summary."""
    starts = [(sweep / str(job) / ".hydra" / "config.yaml").stat().st_mtime for job in jobs]
    ends = [(sweep / str(job) / "summary.json").stat().st_mtime for job in jobs]
    return min(starts), max(ends)


def test_two_workers_train_the_two_packs_at_once_each_member_as_in_one_process(one_process, tmp_path):
    sweep = tmp_path / "sweep"
    result = packed(sweep, "hydra.launcher.workers=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 jobs in 1 groups sharing a backbone setup, 2 packs placed on this machine, 2 processes" in result.stdout
    assert "pack 2: jobs 4,5,6,7 (4 runs)" in result.stdout
    assert result.stdout.count("runs finished") == 2
    first, second = (span(sweep, jobs) for jobs in PACKS)
    assert first[0] < second[1] and second[0] < first[1]  # the two packs overlapped in time
    assert_members_equal(sweep, one_process)


def test_submitit_runs_one_job_per_pack(one_process, tmp_path):
    sweep = tmp_path / "sweep"
    result = packed(sweep, "+hydra.launcher.submitit={cluster:local,timeout_min:10}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "submitted 2 pack jobs through submitit (local)" in result.stdout
    jobs = [job for job in (sweep / ".submitit").iterdir() if job.name[0].isdigit()]
    assert len(jobs) == 2  # one job (here: one array task) per pack
    assert_members_equal(sweep, one_process)


LONGER = ["hydra.launcher.workers=2", "trainer.max_steps=30", "trainer.log_every=1"]  # a train event per step


@pytest.fixture(scope="module")
def one_process_longer(tmp_path_factory):
    """The 30-step sweep in one process: what a sweep stopped mid-way and rerun must end as."""
    sweep = tmp_path_factory.mktemp("one_process_longer") / "sweep"
    assert packed(sweep, "hydra.launcher.workers=1", "trainer.max_steps=30").returncode == 0
    return sweep


def driver_once_both_packs_checkpointed(sweep: Path, output: Path, past: int) -> subprocess.Popen:
    """The 30-step sweep on two workers, returned once each pack has a checkpoint past step `past`."""
    with open(output, "w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "ptlab.cli.train", *sweep_command(sweep, *LONGER)], cwd=REPO,
                                  env={**os.environ, **OFFLINE_ENV}, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.time() + 300
    while not all(checkpoint_step(sweep / str(pack[0])) > past for pack in PACKS):
        assert driver.poll() is None and time.time() < deadline, "the sweep ended before both packs had a checkpoint"
        time.sleep(0.05)
    return driver


def workers_of(sweep: Path) -> set:
    return {json.loads((sweep / str(pack[0]) / ".ptlab.holder.json").read_text())["pid"] for pack in PACKS}


def trained_steps(folder: Path) -> list:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if '"train"' in line]


def assert_rerun_resumes(sweep: Path, reference: Path, checkpoints: dict, *extra: str) -> str:
    """The same command again: each member resumes from the checkpoint it had, trains each step
    once, and ends as the sweep that was never stopped; the rerun's output."""
    rerun = packed(sweep, *LONGER, *extra)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_members_equal(sweep, reference)
    for job, step in checkpoints.items():
        log = (sweep / str(job) / "train.log").read_text()
        if step:  # resumed from the checkpoint it had, so nothing before it trained twice
            assert f"at step {step}" in log and "resumed from" in log, (job, step)
        steps = trained_steps(sweep / str(job))
        assert steps == sorted(set(steps)) == list(range(1, 31)), job  # each step trained (and recorded) once
    return rerun.stdout


def test_a_stopped_driver_loses_nothing_sigterm_checkpoints_each_pack_and_kill_9_takes_its_workers(
    one_process_longer, tmp_path
):
    """The driver stopped twice, then the same command: SIGTERM (SLURM's preemption, a scancel)
    makes each pack checkpoint the step it is at; a kill -9 of the rerun takes its workers along."""
    sweep, output = tmp_path / "sweep", tmp_path / "sigterm.log"
    driver = driver_once_both_packs_checkpointed(sweep, output, past=0)
    workers = workers_of(sweep)
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=300) == 128 + signal.SIGTERM, output.read_text()[-3000:]
    assert output.read_text().strip().splitlines()[-1].startswith("ptlab: SIGTERM at step"), output.read_text()[-3000:]
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a worker outlived its driver"
    stopped = {job: checkpoint_step(sweep / str(job)) for job in range(8)}
    for job, step in stopped.items():  # each member checkpointed the last step it trained: none is lost
        assert not (sweep / str(job) / "summary.json").exists(), job
        assert step and step == max(trained_steps(sweep / str(job)), default=0), (job, step)

    driver = driver_once_both_packs_checkpointed(sweep, tmp_path / "killed.log", past=max(stopped.values()))
    workers = workers_of(sweep)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(2)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a worker outlived its driver"
    at_kill = {job: checkpoint_step(sweep / str(job)) for job in range(8)}
    assert not any((sweep / str(job) / "summary.json").exists() for job in range(8))
    for job, step in at_kill.items():  # the first rerun resumed each member where SIGTERM stopped it
        assert f"at step {stopped[job]}" in (sweep / str(job) / "train.log").read_text() and step >= stopped[job], job
    assert_rerun_resumes(sweep, one_process_longer, at_kill)


def test_a_killed_worker_takes_only_its_own_pack_and_the_queue_trains_on_a_new_one(one_process_longer, tmp_path):
    """Four packs of two on two workers; the worker of the first pack gets kill -9 mid-pack (the OOM
    killer, a segfault): its two members fail with their checkpoints kept, the other pack and the
    two queued behind train to their end, the driver's last line names exactly the lost members and
    exits 1; the same command resumes them."""
    sweep, output = tmp_path / "sweep", tmp_path / "crash.log"
    command = sweep_command(sweep, *LONGER, "hydra.launcher.pack_size=2")  # the later pack_size wins
    with open(output, "w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "ptlab.cli.train", *command],
                                  cwd=REPO, env={**os.environ, **OFFLINE_ENV}, stdout=out, stderr=subprocess.PIPE,
                                  text=True)  # fmt: skip
    deadline = time.time() + 300
    while min(checkpoint_step(sweep / "0"), checkpoint_step(sweep / "1")) == 0:  # both members checkpointed once
        assert driver.poll() is None and time.time() < deadline, output.read_text()[-3000:]
        time.sleep(0.05)
    worker = json.loads((sweep / "0" / ".ptlab.holder.json").read_text())["pid"]
    assert worker != driver.pid
    os.kill(worker, signal.SIGKILL)
    _, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert "2 of 8 jobs failed" in last and re.findall(r"job (\d+) \(", last) == ["0", "1"], last
    assert "its worker process died: signal 9 (SIGKILL)" in last and "held by" not in last, last
    at_kill = {}
    for job in (0, 1):
        failure = json.loads((sweep / str(job) / "failure.json").read_text())["error"]
        assert "its worker process died: signal 9" in failure, failure
        at_kill[job] = checkpoint_step(sweep / str(job))
        assert 0 < at_kill[job] < 30 and read_summary(sweep / str(job))["status"] == "failed", job
    for job in range(2, 8):  # the live pack and both queued behind the dead worker trained to their end
        assert read_summary(sweep / str(job))["status"] == "finished", job
    rerun = assert_rerun_resumes(sweep, one_process_longer, at_kill, "hydra.launcher.pack_size=2")
    assert f"{sweep / '0'}: freed by pid {worker}, which died; taken" in rerun


def test_a_member_held_by_a_live_process_is_skipped_named_and_the_sweep_exits_non_zero(one_process, tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "5").mkdir(parents=True)
    with FolderLocks() as locks:  # this test's process holds job 5's folder, as a live driver would
        locks.take(sweep / "5", timeout_s=600)
        result = packed(sweep, "hydra.launcher.workers=2")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "1 of 8 jobs failed: job 5" in last and f"its folder is held by pid {os.getpid()}" in last, last
    assert not (sweep / "5" / "summary.json").exists() and not (sweep / "5" / "failure.json").exists()
    for job in (0, 1, 2, 3, 4, 6, 7):
        assert read_summary(sweep / str(job))["best"] == pytest.approx(read_summary(one_process / str(job))["best"], abs=1e-5)


@pytest.mark.parametrize(
    "settings, message",
    [
        (["hydra.launcher.workers=0"], "hydra.launcher.workers=0: give a whole number of packs at once"),
        (["hydra.launcher.workers=2", "+hydra.launcher.submitit={cluster:local}"],
         "hydra.launcher: submitit and workers each say where the packs train: give one"),
        (["+hydra.launcher.ray.adress=x"], "hydra.launcher.ray.adress is not a setting of hydra.launcher.ray"),
    ],
)  # fmt: skip
def test_a_bad_placement_is_one_line_before_anything_trains(tmp_path, settings, message):
    result = packed(tmp_path / "sweep", *settings)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ptlab: error:") and message in last, result.stderr[-2000:]
    assert "trainable parameters" not in result.stdout


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Every Ray scenario on one real two-node cluster, inside a network namespace of its own."""
    out = tmp_path_factory.mktemp("ray")
    env = {**os.environ, **OFFLINE_ENV, "RAY_DISABLE_USAGE_STATS": "1"}
    script = f"ip link set lo up && exec {sys.executable} tests/ray_cluster_scenarios.py {out} '{json.dumps(SWEEP)}'"
    done = subprocess.run(["unshare", "-n", "sh", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "scenarios.json").read_text())


def test_on_a_two_node_ray_cluster_each_pack_is_a_task_and_each_member_ends_as_in_one_process(ray_cluster, one_process):
    out, report = ray_cluster
    assert report["plain"]["rc"] == 0, (out / "plain.log").read_text()[-3000:]
    log = (out / "plain.log").read_text()
    assert "hydra.launcher.ray: 2 pack tasks on the cluster, each asking CPU=1" in log
    assert "2 packs placed on the Ray cluster, 2 packs at once" in log
    first, second = (span(out / "plain", jobs) for jobs in PACKS)
    assert first[0] < second[1] and second[0] < first[1]  # one pack per node, at the same time
    assert_members_equal(out / "plain", one_process)


def test_a_pack_whose_node_is_lost_is_retried_on_the_other_and_its_members_resume(ray_cluster, one_process):
    out, report = ray_cluster
    lost = report["node_lost"]
    assert lost["rc"] == 0, (out / "node_lost.log").read_text()[-3000:]
    assert not lost["worker_alive_after"]
    sweep = out / "node_lost"
    assert_members_equal(sweep, one_process)
    resumed_at = {}
    for job in range(8):
        log = (sweep / str(job) / "train.log").read_text()
        starts = [line for line in log.splitlines() if "resumed from" in line or "starting from step" in line]
        assert "starting from step 0" in starts[0], (job, starts)
        if job not in lost["jobs"]:  # the other pack: trained once, from step 0
            assert len(starts) == 1, (job, starts)
        elif len(starts) > 1:  # opened again by Ray's retry of the task (one that had finished is skipped)
            step = int(re.search(r"(?:at|from) step (\d+)", starts[-1]).group(1))
            assert len(starts) == 2 and step >= lost["checkpoint_at_removal"][str(job)], (job, starts, lost)
            resumed_at[job] = step
    assert any(resumed_at.values()), lost  # some member resumed from a checkpoint written on the lost node


def test_ray_settings_no_node_can_meet_are_one_line(ray_cluster):
    out, report = ray_cluster
    for name, message in {
        "no_node_has": "hydra.launcher.ray asks GPU=1, CPU=1 for each pack, and no node of the cluster has that",
        "nobody_there": "hydra.launcher.ray.address='127.0.0.1:9': no Ray cluster answers there",
    }.items():
        assert report[name]["rc"] == 2, name
        lines = [line for line in (out / f"{name}.log").read_text().splitlines() if line.startswith("ptlab: error:")]
        assert len(lines) == 1 and message in lines[0], (name, (out / f"{name}.log").read_text()[-2000:])
        assert "trainable parameters" not in (out / f"{name}.log").read_text()

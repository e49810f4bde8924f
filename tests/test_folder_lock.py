"""One writer per run folder (ptlab/training/folder_lock.py), with real processes: a second
process on a held folder is refused in one line naming the holder and writes nothing there; a
holder killed with kill -9 blocks nothing; a holder on another host holds while its heartbeat
moves and is taken over once it is older than the timeout; in a packed sweep a held member fails alone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_bad_input import one_line_error
from test_packed_sweeps import packed_sweep
from test_scale_out import QUICK, cli

from ptlab.errors import FolderHeld
from ptlab.training.folder_lock import HOLDER_FILE, FolderLocks, Holder
from ptlab.training.run_folder import FAILURE_FILE, read_summary

from conftest import OFFLINE_ENV

HOLDER_SCRIPT = Path(__file__).with_name("folder_holder.py")
SHORT = [*QUICK, "logger=none", "trainer.max_steps=2", "trainer.eval_every=2"]


def holding(folder: Path, timeout_s: float) -> subprocess.Popen:
    """A process that holds `folder` through ptlab's lock until its stdin closes."""
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, str(HOLDER_SCRIPT), str(folder), str(timeout_s)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **OFFLINE_ENV}, text=True,
    )  # fmt: skip
    assert process.stdout.readline().strip() == "held"
    return process


def with_an_earlier_failure(folder: Path) -> Path:
    """A folder whose earlier attempt failed: a process that prepares it deletes `failure.json`."""
    folder.mkdir(parents=True)
    (folder / FAILURE_FILE).write_text('{"status": "failed", "error": "an earlier attempt"}')
    (folder / "metrics.jsonl").write_text('{"step": 2, "split": "train", "loss": 0.5}\n')
    return folder


def snapshot(folder: Path) -> dict:
    """Every path under `folder` (itself too) with its modification time and size."""
    return {
        str(path): (path.stat().st_mtime_ns, path.stat().st_size) for path in [folder, *folder.rglob("*")]
    }


def test_a_held_folder_refuses_a_second_run_untouched_and_a_killed_holder_blocks_nothing(tmp_path):
    run_dir = with_an_earlier_failure(tmp_path / "run")
    holder = holding(run_dir, timeout_s=1e6)  # no heartbeat while the test looks
    try:
        before = snapshot(run_dir)
        line = one_line_error(cli([*SHORT, f"hydra.run.dir={run_dir}"], timeout=300), 2)
        assert (
            f"ptlab: error: run folder {run_dir} is held by pid {holder.pid} on host {socket.gethostname()}"
            in line
        )
        assert "choose another folder (hydra.run.dir=..." in line
        assert snapshot(run_dir) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert Holder.read(run_dir).pid == holder.pid  # the dead holder's record stays behind
    rerun = cli([*SHORT, f"hydra.run.dir={run_dir}"], timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{run_dir}: freed by pid {holder.pid}, which died; taken" in rerun.stdout
    assert read_summary(run_dir)["status"] == "finished" and not (run_dir / FAILURE_FILE).exists()
    assert not (run_dir / HOLDER_FILE).exists()  # released at the end


def wait_for_a_new_heartbeat(folder: Path, after: float) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        holder = Holder.read(folder)
        if holder is not None and holder.heartbeat > after:
            return
        time.sleep(0.05)
    raise AssertionError(f"no heartbeat after {after} in {folder}")


def test_a_holder_on_another_host_holds_while_it_beats_and_is_taken_over_once_it_stops(tmp_path):
    run_dir = with_an_earlier_failure(tmp_path / "run")
    holder = holding(run_dir, timeout_s=0.5)  # a heartbeat every 0.05 s
    wait_for_a_new_heartbeat(run_dir, Holder.read(run_dir).started)
    holder.stdin.close()  # a holder that ends gives the folder up
    assert holder.wait(timeout=60) == 0 and not (run_dir / HOLDER_FILE).exists()

    # a file system that keeps locks per host: the OS lock is free, the holder record decides
    elsewhere = Holder("node-elsewhere", 4242, time.time() - 3600, time.time(), 2.0)  # it beats every 0.2 s
    elsewhere.write(run_dir)
    stop = threading.Event()

    def beat():
        while not stop.wait(0.2):
            elsewhere.heartbeat = time.time()
            elsewhere.write(run_dir)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    def untouched():  # what the beats do not rewrite: every file but the holder record
        return {path: stat for path, stat in snapshot(run_dir).items() if path not in (str(run_dir),
                str(run_dir / HOLDER_FILE))}  # fmt: skip

    before = untouched()
    try:
        with FolderLocks() as locks, pytest.raises(FolderHeld, match="held by pid 4242 on host node-elsewhere"):
            locks.take(run_dir, 2.0)  # its heartbeat moves while this waits: it lives
    finally:
        stop.set()
        thread.join()
    assert untouched() == before
    # its heartbeat stops (its host is gone): a taker waits for it to be older than the timeout
    with FolderLocks() as locks:
        locks.take(run_dir, 2.0)
        assert time.time() - elsewhere.heartbeat >= 2.0 and Holder.read(run_dir).is_this_process()
    elsewhere.heartbeat = time.time() - 120  # a record long stale: taken over at once
    elsewhere.write(run_dir)
    taker = cli([*SHORT, "trainer.lock_timeout_s=60", f"hydra.run.dir={run_dir}"], timeout=300)
    assert taker.returncode == 0, taker.stderr[-2000:]
    assert "taken over from pid 4242 on host node-elsewhere, whose last heartbeat is" in taker.stdout
    assert "waiting up to" not in taker.stdout
    assert read_summary(run_dir)["status"] == "finished"


def test_a_packed_member_whose_folder_is_held_fails_alone_and_untouched(tmp_path):
    sweep = tmp_path / "sweep"
    held = with_an_earlier_failure(sweep / "1")
    holder = holding(held, timeout_s=1e6)
    try:
        before = snapshot(held)
        result = packed_sweep(
            sweep, "backbone=tiny_t5", "trainer.max_steps=2", "trainer.eval_every=2", "seed=0,1"
        )
        assert snapshot(held) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"ptlab: error: {held}: run folder {held} is held by pid {holder.pid}" in result.stderr
    assert "Traceback" not in result.stderr
    assert read_summary(sweep / "0")["status"] == "finished"
    assert json.loads((held / FAILURE_FILE).read_text())["error"] == "an earlier attempt"
    report = result.stderr.splitlines()[-1]  # the sweep's end: the held job, not its holder's old failure
    assert report.startswith("ptlab: error: 1 of 2 jobs failed: ") and "an earlier attempt" not in report
    assert (
        f"job 1 ({held}): not run, its folder is held by pid {holder.pid} on host {socket.gethostname()}"
        in report
    )

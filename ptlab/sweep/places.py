"""Where a packed sweep's planned packs train (ptlab/sweep/plan.py) outside the driver:
on this machine's devices (`hydra.launcher.workers`: a worker process per device, one pack at a
time, the rest queued; across successive halving's rounds a worker keeps its backbone loaded), or
as one submitit job per pack. Each place runs `run_jobs` on its
packs and reports each pack as it ends; the driver's own process is `launcher.place`'s, Ray's
place is ptlab/sweep/ray_place.py.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence

from ptlab.training.preemption import PREEMPTION_SIGNALS, Preempted, note_signals_between_packs

if TYPE_CHECKING:  # the driver's --help imports no torch
    from ptlab.training.opened_run import Job

log = logging.getLogger("ptlab")

PR_SET_PDEATHSIG = 1


@dataclass
class PlacedPack:
    """A pack as a place receives it: its group, its jobs, its size limit (None: what fits its
    device once its backbone is loaded) and its jobs' numbers in the sweep."""

    group: int
    jobs: List[Job]
    size: Optional[int]
    numbers: List[int]


PackEnded = Callable[[PlacedPack, Sequence[Optional[float]]], None]


def cores() -> int:
    return len(os.sched_getaffinity(0))


def pack_process(driver: Connection, device: Optional[int], threads: int) -> None:
    """A worker process: it dies with its driver (a kill -9 of the sweep leaves no pack training
    unseen), keeps a termination signal for its next pack to stop on, owns the GPU `device` (None:
    the CPU) and `threads` cores, and trains the packs (jobs, size) it receives from `driver` one
    after another on the backbones it keeps loaded, sending back each outcome: ("values", each
    member's best) or ("preempted", signum, step), after which it ends. None, or the driver gone,
    ends it too."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the driver died before the line above
        os._exit(1)
    note_signals_between_packs()
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(device)
    import torch
    import tqdm

    torch.set_num_threads(threads)
    # tqdm's default lock is a multiprocessing semaphore, which a kill -9 of this process would
    # leave to the resource tracker (a warning below the driver's last line): its bars are its own
    tqdm.tqdm.set_lock(threading.RLock())
    loaded: Dict[str, Any] = {}  # this process's backbones, by setup, for its next packs
    while (pack := received(driver, wait=True)) is not None:
        jobs, size = pack
        try:
            driver.send(("values", run_placed_pack(jobs, size, loaded)))
        except Preempted as stop:  # its members' checkpoints are written
            driver.send(("preempted", stop.signum, stop.step))
            return


def run_placed_pack(jobs: List[Job], size: Optional[int], loaded: Optional[Dict[str, Any]] = None) -> List[Optional[float]]:
    """`run_jobs` in a process of its own (a worker, a submitit job, a Ray task), logging as the
    driver's jobs do: Hydra's format on stdout, and each member's lines in its train.log; a worker
    keeps its backbones in `loaded` for its next packs."""
    from ptlab.training.job import run_jobs

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
                        stream=sys.stdout)  # fmt: skip
    logging.getLogger().setLevel(logging.INFO)
    return run_jobs(jobs, size, loaded=loaded)


@dataclass
class Worker:
    """A worker process, the device it holds and the pipe its packs and outcomes travel."""

    process: BaseProcess
    pipe: Connection
    device: Optional[int]


class Workers:
    """This machine's worker processes (`hydra.launcher.workers`): at most `count` at once, each
    owning one of `gpus` GPUs (0: they split the cores). A worker trains one pack at a time; with
    `keep` (successive halving's rounds) a worker whose pack ended waits for the next pack, on the
    backbone it has loaded, until `close`; otherwise it ends with its pack and the next pack starts
    in a new process. A process that dies (kill -9, the OOM killer, a segfault) fails its pack's
    members alone, their checkpoints kept for the rerun; the other packs, running or queued, go on.
    After a termination signal no pack starts, and the running ones checkpoint and stop (Preempted)."""

    def __init__(self, count: int, gpus: int, keep: bool = False) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.free: List[Optional[int]] = [worker % gpus if gpus else None for worker in range(count)]
        self.threads = max(1, cores() // count)
        self.idle: List[Worker] = []
        self.keep, self.count, self.gpus = keep, count, gpus

    def worker(self) -> Worker:
        """An idle worker (its backbones loaded), else a new process on a free device."""
        if self.idle:
            return self.idle.pop(0)
        ours, theirs = self.context.Pipe()
        device = self.free.pop(0)
        process = self.context.Process(target=pack_process, args=(theirs, device, self.threads))
        process.start()
        theirs.close()
        return Worker(process, ours, device)

    def train(self, packs: Sequence[PlacedPack], ended: PackEnded) -> None:
        """The packs in plan order, each reported to `ended` as it ends."""
        log.info("hydra.launcher.workers=%d: %d packs, each in a worker process on %s", self.count, len(packs),
                 f"one of {self.gpus} GPUs" if self.gpus else f"{self.threads} of this machine's {cores()} cores")  # fmt: skip
        queued, running, preempted = list(packs), {}, []
        with signals_passed_to_workers() as signalled:
            while queued or running:
                while queued and (self.idle or self.free) and not (preempted or signalled):
                    pack, worker = queued.pop(0), self.worker()
                    # a pack's configs fill the pipe: sent aside, so the next process starts meanwhile
                    threading.Thread(target=hand_over, args=(worker.pipe, (pack.jobs, pack.size)), daemon=True).start()
                    running[worker.pipe] = running[worker.process.sentinel] = (pack, worker)
                for ready in multiprocessing.connection.wait(list(running)):
                    if ready not in running:  # its pipe and its sentinel were both ready
                        continue
                    pack, worker = running.pop(ready)
                    running.pop(worker.pipe if ready is worker.process.sentinel else worker.process.sentinel)
                    outcome = received(worker.pipe)
                    self.release(worker, outcome is not None and outcome[0] == "values")
                    if outcome is not None and outcome[0] == "preempted":
                        preempted.append(Preempted(outcome[1], outcome[2]))
                    elif outcome is not None:
                        ended(pack, outcome[1])
                    elif signalled and worker.process.exitcode == -signalled[0]:  # stopped before its guard was up
                        preempted.append(Preempted(signalled[0], 0))
                    else:
                        ended(pack, lost(pack, f"its worker process died: {exit_reason(worker.process.exitcode)}"))
        if preempted:
            raise preempted[0]

    def release(self, worker: Worker, healthy: bool) -> None:
        """A worker whose pack ended: kept for the next pack, or ended and its device freed."""
        if healthy and self.keep:
            self.idle.append(worker)
            return
        hand_over(worker.pipe, None)
        worker.process.join()
        self.free.append(worker.device)

    def close(self) -> None:
        """End the idle workers (their backbones go with them)."""
        self.keep = False
        while self.idle:
            self.release(self.idle.pop(), healthy=True)


def received(connection: Connection, wait: bool = False) -> Optional[Any]:
    """What came down a pipe; None when the other end closed without sending it (a process that
    died), or, unless `wait`, when nothing is there."""
    try:
        return connection.recv() if wait or connection.poll() else None
    except EOFError:
        return None


def hand_over(connection: Connection, pack: Any) -> None:
    """Send a pack's process its pack; one that died first is reported by its exit, not here."""
    try:
        connection.send(pack)
    except OSError:
        pass


def exit_reason(exitcode: Optional[int]) -> str:
    if exitcode is not None and exitcode < 0:
        return f"signal {-exitcode} ({signal.Signals(-exitcode).name})"
    return f"exit code {exitcode}, no result"


@contextmanager
def signals_passed_to_workers() -> Iterator[List[int]]:
    """A termination signal to the driver (SLURM's preemption, a `kill`) goes on to its workers,
    whose packs checkpoint after their step while the driver waits for them: a stopped sweep loses
    no step. Yields the signals received (no pack starts after one). A kill -9 of the driver still
    takes its workers down (pack_process)."""
    received: List[int] = []

    def pass_on(signum: int, frame) -> None:
        log.warning("received %s: passing it to the workers; each pack checkpoints after its step",
                    signal.Signals(signum).name)  # fmt: skip
        received.append(signum)
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:  # it has just ended
                pass

    previous = {signum: signal.signal(signum, pass_on) for signum in PREEMPTION_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def on_submitit(packs: Sequence[PlacedPack], params: Dict[str, Any], sweep_dir: Path, ended: PackEnded) -> None:
    """One submitit job per pack, as one array where the cluster allows it, with the keys Hydra's
    submitit launcher takes (its logs under the sweep's `.submitit/`, as Hydra's); waits for all."""
    import submitit

    params = dict(params)
    cluster = params.pop("cluster", None)
    folder = params.pop("submitit_folder", str(sweep_dir / ".submitit" / "%j"))
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    base = {"timeout_min", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "name",
            "stderr_to_stdout"}  # fmt: skip
    prefix = executor.cluster
    executor.update_parameters(
        **{key if key in base else f"{prefix}_{key}": value for key, value in params.items()}
    )
    jobs = executor.map_array(run_placed_pack, [pack.jobs for pack in packs], [pack.size for pack in packs])
    log.info("submitted %d pack jobs through submitit (%s): %s", len(jobs), executor.cluster,
             ", ".join(job.job_id for job in jobs))  # fmt: skip
    for pack, job in zip(packs, jobs):
        try:
            values = job.result()
        except Exception as error:  # noqa: BLE001 - the job died or raised: its members fail, the others go on
            values = lost(pack, f"its submitit job {job.job_id} ended without a result ({first_line(error)})")
        ended(pack, values)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def lost(pack: PlacedPack, why: str) -> List[Optional[float]]:
    """A pack whose process or job ended without results: each member that had not ended (its
    summary says so) fails alone, its checkpoints kept, and a rerun of the sweep resumes it."""
    from ptlab.training.job import reached_summary
    from ptlab.training.opened_run import ended_value, record_failed

    values: List[Optional[float]] = []
    for job in pack.jobs:
        summary = reached_summary(job.facts.run_dir, job)
        if summary is not None:  # it ended (finished, or stopped at its rung) before its process did
            values.append(ended_value(job.config, summary))
            continue
        record_failed(job.facts.run_dir, RuntimeError(f"{why}; rerun the sweep to resume it"))
        values.append(None)
    return values

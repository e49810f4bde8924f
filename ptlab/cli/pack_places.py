"""Where a packed sweep's planned packs train (ptlab/training/pack_plan.py) outside the driver:
on this machine's devices (`hydra.launcher.workers`: one process per device, packs queued), or as
one submitit job per pack. Each place runs `run_jobs` on its packs and reports each pack as it
ends; the driver's own process is `packed_launch.place`'s, Ray's place is ptlab/cli/ray_place.py.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from concurrent.futures import CancelledError, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
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


def worker_start(devices: Any, threads: int) -> None:
    """A worker dies with its driver (a kill -9 of the sweep leaves no pack training unseen), keeps
    a termination signal for its packs to stop on, owns the GPU it takes from `devices` (None: the
    CPU) and its share of the cores."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the driver died before the line above
        os._exit(1)
    note_signals_between_packs()
    device = devices.get()
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(device)
    import torch

    torch.set_num_threads(threads)


def run_placed_pack(jobs: List[Job], size: Optional[int]) -> List[Optional[float]]:
    """`run_jobs` in a process of its own (a worker, a submitit job, a Ray task), logging as the
    driver's jobs do: Hydra's format on stdout, and each member's lines in its train.log."""
    from ptlab.training.job import run_jobs

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
                        stream=sys.stdout)  # fmt: skip
    logging.getLogger().setLevel(logging.INFO)
    return run_jobs(jobs, size)


def on_workers(packs: Sequence[PlacedPack], workers: int, gpus: int, ended: PackEnded) -> None:
    """At most `workers` packs at once, each in a process of its own that owns one of `gpus` GPUs
    (0: they split the cores), queued in plan order; a worker that dies fails its pack's members
    alone (their checkpoints stay: a rerun resumes them)."""
    context = multiprocessing.get_context("spawn")
    devices = context.Queue()
    for worker in range(workers):
        devices.put(worker % gpus if gpus else None)
    threads = max(1, cores() // workers)
    log.info("hydra.launcher.workers=%d: %d packs, each in a process of its own on %s", workers, len(packs),
             f"one of {gpus} GPUs" if gpus else f"{threads} of this machine's {cores()} cores")  # fmt: skip
    preempted: List[Preempted] = []
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=worker_start, initargs=(devices, threads))
    with signals_passed_to_workers(), pool:
        futures = {pool.submit(run_placed_pack, pack.jobs, pack.size): pack for pack in packs}
        for future in as_completed(futures):
            pack = futures[future]
            try:
                values = future.result()
            except CancelledError:  # not started when the sweep was stopped: the rerun trains it
                continue
            except Preempted as stop:  # its members' checkpoints are written
                preempted.append(stop)
                pool.shutdown(wait=False, cancel_futures=True)
                continue
            except BrokenProcessPool as error:
                values = lost(pack, f"its pack's worker process died ({first_line(error)})")
            ended(pack, values)
    if preempted:
        raise preempted[0]


@contextmanager
def signals_passed_to_workers() -> Iterator[None]:
    """A termination signal to the driver (SLURM's preemption, a `kill`) goes on to its workers,
    whose packs checkpoint after their step while the driver waits for them: a stopped sweep loses
    no step. A kill -9 of the driver still takes its workers down (worker_start)."""

    def pass_on(signum: int, frame) -> None:
        log.warning("received %s: passing it to the workers; each pack checkpoints after its step",
                    signal.Signals(signum).name)  # fmt: skip
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:  # it has just ended
                pass

    previous = {signum: signal.signal(signum, pass_on) for signum in PREEMPTION_SIGNALS}
    try:
        yield
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
    """A pack whose process or job ended without results: each member fails alone, its
    checkpoints kept, and a rerun of the sweep resumes it."""
    from ptlab.training.opened_run import record_failed

    for job in pack.jobs:
        record_failed(job.facts.run_dir, RuntimeError(f"{why}; rerun the sweep to resume it"))
    return [None] * len(pack.jobs)

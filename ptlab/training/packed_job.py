"""The jobs of one pack, each a whole run in its own folder, trained together (ptlab/training/pack.py).

`run_group(jobs, pack_size)` is to packs what `ptlab.training.job.run` is to one run: per member it
holds the folder (ptlab/training/folder_lock.py: a folder another process holds fails that member
alone) and prepares it, skips a finished run, builds the run on the pack's one frozen backbone, resumes it from
its checkpoint, records its start (snapshots, its own train.log, its own W&B run), and at its end
writes its summary, or its one-line failure. A member that fails before training (a bad config, a
data error, a checkpoint that does not fit) or during it (a loss that is not finite) fails alone.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig

from ptlab.config.schema import Config
from ptlab.errors import ConfigError, TrainingFault
from ptlab.training.build import SharedBackbone, frozen_backbone
from ptlab.training.distributed import World
from ptlab.training.folder_lock import FolderLocks
from ptlab.training.job import (
    OpenRun,
    close_run,
    finished_summary,
    open_run,
    prepared_run_dir,
    setup_hardware,
    skipped,
)
from ptlab.training.pack import Member, Pack
from ptlab.training.packing import auto_pack_size, chunked, stage_plan
from ptlab.training.run_folder import RunFacts, RunLog, record_failure

log = logging.getLogger("ptlab")


@dataclass
class PackedJob:
    """One job of a pack: its composed config (as Hydra gave it, and validated) and what Hydra
    knows of it."""

    cfg: DictConfig
    config: Config
    facts: RunFacts


def failed(run_dir: Optional[Path], error: Exception) -> None:
    """A member's one-line error on stderr and in its folder; the other members go on."""
    print(f"ptlab: error: {run_dir}: {error}", file=sys.stderr)
    if run_dir is not None:
        record_failure(run_dir, error)


Ended = Callable[[int, Optional[float]], None]  # a job's index and best validation value (None: failed)


def unheard(index: int, value: Optional[float]) -> None:
    """Nobody is told when a job ends (a group trained in a submitit job: its launcher reads the results)."""


def run_group(
    jobs: Sequence[PackedJob], pack_size: Optional[int], ended: Ended = unheard
) -> List[Optional[float]]:
    """Jobs that share one backbone setup (`ptlab.training.packing.group_jobs`), in packs of at most
    `pack_size` (None: as many as fit, `auto_pack_size`) on one backbone loaded once; returns each
    one's best validation value (None: it failed), and tells `ended` as each one ends. Finished jobs
    are skipped before anything loads. Each job's folder is held by this process until the group
    ends; a folder another process holds fails its job alone."""
    with FolderLocks() as locks:
        return run_held_group(jobs, pack_size, ended, locks)


def run_held_group(
    jobs: Sequence[PackedJob], pack_size: Optional[int], ended: Ended, locks: FolderLocks
) -> List[Optional[float]]:
    results: List[Optional[float]] = [None] * len(jobs)
    todo, folders = [], {}
    for index, job in enumerate(jobs):
        try:
            folder = prepared_run_dir(job.config, job.facts.run_dir, locks, World())
            finished = finished_summary(folder, job.config) if job.config.trainer.resume else None
        except ConfigError as error:
            failed(job.facts.run_dir, error)
            ended(index, None)
            continue
        if finished is not None:  # a rerun sweep skips its finished members
            results[index] = skipped(folder, job.config, finished)
            ended(index, results[index])
        else:
            todo.append(index)
            folders[index] = folder
    if not todo:
        return results
    setup_hardware(jobs[todo[0]].config)
    started = time.perf_counter()
    shared = frozen_backbone(jobs[todo[0]].config)
    log.info("backbone %s loaded once for %d runs (%.1f s)", jobs[todo[0]].config.backbone.name, len(todo),
             time.perf_counter() - started)  # fmt: skip
    if pack_size is None:
        device = torch.device("cuda" if jobs[todo[0]].config.hardware.device == "cuda" else "cpu")
        pack_size, why = auto_pack_size(shared.backbone, [jobs[i].config for i in todo], device)
        log.info("hydra.launcher.pack_size unset: %s", why)
    for pack in chunked(todo, pack_size):
        in_pack = [jobs[i] for i in pack], [folders[i] for i in pack]
        for index, value in zip(pack, run_pack(*in_pack, shared, lambda i, v, pack=pack: ended(pack[i], v))):
            results[index] = value
    return results


def run_pack(
    jobs: Sequence[PackedJob], folders: Sequence[Path], shared: SharedBackbone, ended: Ended = unheard
) -> List[Optional[float]]:
    """Train the jobs, in their prepared run `folders`, as one pack on `shared`; returns each one's
    best validation value, None for a member that failed, and tells `ended` as each one ends."""
    results: List[Optional[float]] = [None] * len(jobs)
    world = World()
    opened: Dict[int, OpenRun] = {}
    index_of: Dict[int, int] = {}  # member -> its job's index
    members: List[Member] = []
    with ExitStack() as stack:
        for index, (job, folder) in enumerate(zip(jobs, folders)):
            run_log = stack.enter_context(RunLog())
            with run_log.speaking():
                try:
                    run = open_run(folder, job.config, job.cfg, world, job.facts, run_log, shared)
                except (ConfigError, TrainingFault) as error:
                    failed(folder, error)
                    ended(index, None)
                    continue
            member = Member(run.trainer, run_log.speaking, folder.name, stage_plan=stage_plan(job.config))
            opened[id(member)], index_of[id(member)] = run, index
            members.append(member)
            stack.callback(run.tracker.finish)  # also when the pack stops (a signal, a bug)
        if not members:
            return results

        def finished(member: Member, summary: Dict) -> None:
            run = opened[id(member)]
            results[index_of[id(member)]] = close_run(run, summary)
            run.tracker.finish()
            ended(index_of[id(member)], results[index_of[id(member)]])

        def failed_member(member: Member, error: Exception) -> None:
            failed(opened[id(member)].run_dir, error)
            opened[id(member)].tracker.finish()
            ended(index_of[id(member)], None)

        first = opened[id(members[0])].config
        log.info("pack of %d runs on %s: training together", len(members), first.backbone.name)
        Pack(members, first.seed, finished, failed_member).run()
    return results

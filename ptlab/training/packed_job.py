"""The jobs of one pack, each a whole run in its own folder, trained together (ptlab/training/pack.py).

`run_group(jobs, pack_size)` is to packs what `ptlab.training.job.run` is to one run: per member it
prepares the folder, skips a finished run, builds the run on the pack's one frozen backbone, resumes it from
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
from typing import Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig

from ptlab.config.schema import Config
from ptlab.training.build import SharedBackbone, frozen_backbone
from ptlab.training.distributed import World
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
    if run_dir is None:
        return
    try:
        record_failure(run_dir, error)
    except OSError as unrecorded:  # the folder itself is the fault: say so, and go on
        print(f"ptlab: error: {run_dir}: its failure could not be recorded there ({unrecorded})", file=sys.stderr)


def run_group(jobs: Sequence[PackedJob], pack_size: Optional[int]) -> List[Optional[float]]:
    """Jobs that share one backbone setup (`ptlab.training.packing.group_jobs`), in packs of at most
    `pack_size` (None: as many as fit, `auto_pack_size`) on one backbone loaded once; returns each
    one's best validation value (None: it failed). Finished jobs are skipped before anything loads."""
    results: List[Optional[float]] = [None] * len(jobs)
    todo, folders = [], {}
    for index, job in enumerate(jobs):
        try:
            folder = prepared_run_dir(job.config, job.facts.run_dir)
            finished = finished_summary(folder, job.config) if job.config.trainer.resume else None
        except Exception as error:  # noqa: BLE001 - a fault in its folder is its own
            failed(job.facts.run_dir, error)
            continue
        if finished is not None:  # a rerun sweep skips its finished members
            results[index] = skipped(folder, job.config, finished)
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
        for index, value in zip(pack, run_pack([jobs[i] for i in pack], [folders[i] for i in pack], shared)):
            results[index] = value
    return results


def run_pack(
    jobs: Sequence[PackedJob], folders: Sequence[Path], shared: SharedBackbone
) -> List[Optional[float]]:
    """Train the jobs, in their prepared run `folders`, as one pack on `shared`; returns each one's
    best validation value, None for a member that failed."""
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
                except Exception as error:  # noqa: BLE001 - a fault in building or resuming it is its own
                    failed(folder, error)
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

        def failed_member(member: Member, error: Exception) -> None:
            failed(opened[id(member)].run_dir, error)
            try:
                opened[id(member)].tracker.finish()
            except Exception as unfinished:  # noqa: BLE001 - its tracker's fault is its own too
                failed(None, unfinished)

        first = opened[id(members[0])].config
        log.info("pack of %d runs on %s: training together", len(members), first.backbone.name)
        Pack(members, finished, failed_member).run()
    return results

"""Runs trained together as one pack over one frozen backbone, each a whole run in its own folder
(ptlab/training/pack.py); a run alone is a pack of one, through the same code.

Per member: its run is built on the shared backbone, resumed from its checkpoint, recorded (its
own train.log, its own W&B run) and, at its end, its summary written, or its one-line failure.
A member that fails before training (a bad config, a data error, a checkpoint that does not fit)
or during it (a loss that is not finite, a fault in its own files or tracker) fails alone. A
fault the pack cannot pin to one member sends the members still training back to their last
checkpoints: after running out of memory they train again as two packs of half the size, one
after the other, down to packs of one; after another error, one by one, so only the member that
fails alone fails.
"""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from omegaconf import DictConfig

from ptlab.config.schema import Config
from ptlab.training.build import SharedBackbone
from ptlab.training.distributed import World
from ptlab.training.opened_run import OpenRun, close_run, open_run
from ptlab.training.pack import Member, Pack, PackFault
from ptlab.training.packing import stage_plan
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


Ended = Callable[[int, Optional[float]], None]  # a job's index and best validation value (None: failed)


def unheard(index: int, value: Optional[float]) -> None:
    """Nobody is told when a job ends (a run alone; a group trained in a submitit job: its launcher
    reads the results)."""


def train_runs(
    jobs: Sequence[PackedJob], folders: Sequence[Path], shared: Optional[SharedBackbone], world: World,
    alone: bool = False, ended: Ended = unheard,
) -> List[Optional[float]]:  # fmt: skip
    """Train the jobs, in their prepared run `folders`, as one pack on `shared` (None: a run alone
    builds its own backbone); each one's best validation value, None for a member that failed;
    `ended` is told as each one ends. `alone`: a run alone, whose failure is raised (its command
    ends with it), not recorded."""
    results: List[Optional[float]] = [None] * len(jobs)
    parts = [list(range(len(jobs)))]
    while parts:
        part = parts.pop(0)
        try:
            train_part(jobs, folders, part, shared, world, alone, results, ended)
        except PackFault as fault:
            todo = [index for index in part if folders[index].name in {m.name for m in fault.members}]
            size = max(1, len(todo) // 2) if fault.out_of_memory else 1
            log.warning("a pack of %d runs %s (%s): its members train again from their last checkpoints, "
                        "in packs of %d", len(todo), "ran out of memory" if fault.out_of_memory else "failed",
                        str(fault.error).strip().splitlines()[0][:160], size)  # fmt: skip
            parts[:0] = [todo[i : i + size] for i in range(0, len(todo), size)]
    return results


def train_part(
    jobs: Sequence[PackedJob], folders: Sequence[Path], part: List[int], shared: Optional[SharedBackbone],
    world: World, alone: bool, results: List[Optional[float]], ended: Ended,
) -> None:  # fmt: skip
    """The jobs `part` (indices) opened and trained as one pack; each one's result into `results`."""
    opened: Dict[int, OpenRun] = {}
    index_of: Dict[int, int] = {}  # member -> its job's index
    members: List[Member] = []
    with ExitStack() as stack:
        for index in part:
            job, folder = jobs[index], folders[index]
            run_log = stack.enter_context(RunLog())
            with run_log.speaking():
                try:
                    run = open_run(folder, job.config, job.cfg, world, job.facts, run_log, shared)
                except Exception as error:  # noqa: BLE001 - a fault in building or resuming it is its own
                    if alone:
                        raise
                    failed(folder, error)
                    ended(index, None)
                    continue
            member = Member(run.trainer, run_log.speaking, folder.name, stage_plan=stage_plan(job.config))
            opened[id(member)], index_of[id(member)] = run, index
            members.append(member)
            stack.callback(run.tracker.finish)  # also when the pack stops (a signal, a bug)
        if not members:
            return

        def finished(member: Member, summary: Dict) -> None:
            run = opened[id(member)]
            results[index_of[id(member)]] = close_run(run, summary)
            run.tracker.finish()
            ended(index_of[id(member)], results[index_of[id(member)]])

        def failed_member(member: Member, error: Exception) -> None:
            if alone:  # raised once the pack is done: its command ends with it
                raised.append(error)
                return
            failed(opened[id(member)].run_dir, error)
            try:
                opened[id(member)].tracker.finish()
            except Exception as unfinished:  # noqa: BLE001 - its tracker's fault is its own too
                failed(None, unfinished)
            ended(index_of[id(member)], None)

        if not alone:
            first = opened[id(members[0])].config
            log.info("pack of %d runs on %s: training together", len(members), first.backbone.name)
        raised: List[Exception] = []
        Pack(members, finished, failed_member, alone=alone).run()
        if raised:
            raise raised[0]

"""The jobs of one pack, each a whole run in its own folder, trained together (ptlab/training/pack.py).

`run_group(jobs, pack_size)` is to packs what `ptlab.training.job.run` is to one run: per member it
holds the folder (ptlab/training/folder_lock.py: a folder another process holds fails that member
alone) and prepares it, skips a finished run, builds the run on the pack's one frozen backbone, resumes it from
its checkpoint, records its start (snapshots, its own train.log, its own W&B run), and at its end
writes its summary, or its one-line failure (ptlab/training/train_runs.py). A member whose folder
cannot be prepared fails alone, before anything loads.
"""

from __future__ import annotations

import logging
import time
from typing import List, Optional, Sequence

import torch

from ptlab.training.build import frozen_backbone
from ptlab.training.distributed import World
from ptlab.training.folder_lock import FolderLocks
from ptlab.training.job import finished_summary, prepared_run_dir, setup_hardware, skipped
from ptlab.training.pack_plan import balanced
from ptlab.training.packing import auto_pack_size
from ptlab.training.train_runs import Ended, PackedJob, failed, train_runs, unheard

__all__ = ["PackedJob", "failed", "run_group"]

log = logging.getLogger("ptlab")


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
        except Exception as error:  # noqa: BLE001 - a fault in its folder is its own
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
    for pack in balanced(todo, -(-len(todo) // pack_size)):
        values = train_runs([jobs[i] for i in pack], [folders[i] for i in pack], shared, World(),
                            ended=lambda i, v, pack=pack: ended(pack[i], v))  # fmt: skip
        for index, value in zip(pack, values):
            results[index] = value
    return results

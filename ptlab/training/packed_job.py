"""The jobs of one pack, each a whole run in its own folder, trained together (ptlab/training/pack.py).

`run_group(jobs, pack_size)` is to packs what `ptlab.training.job.run` is to one run: per member it
prepares the folder, skips a finished run, builds the run on the pack's one frozen backbone, resumes it from
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
from ptlab.training.job import finished_summary, prepared_run_dir, setup_hardware, skipped
from ptlab.training.packing import auto_pack_size, chunked
from ptlab.training.train_runs import PackedJob, failed, train_runs

__all__ = ["PackedJob", "failed", "run_group"]

log = logging.getLogger("ptlab")


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
        values = train_runs([jobs[i] for i in pack], [folders[i] for i in pack], shared, World())
        for index, value in zip(pack, values):
            results[index] = value
    return results

"""Training jobs, from their folders to their results: `run(cfg)` for one run, `run_jobs` for a
group that shares one backbone setup (a packed sweep's, `ptlab.sweep.grouping.group_jobs`).

Both go through one sequence: each job's folder is held (ptlab/training/folder_lock.py) and
prepared, a finished run is skipped, the backbone is loaded (by a run alone itself, after its data,
so a data error comes first; once for a group), and the jobs train in packs on it
(ptlab/training/loop.py). A failure is raised for a run alone (`OnFailure.RAISE`: its command ends
with it) and recorded for a group's member, whose folder another process holds, say, while the
others go on. `run` is a plain function returning the best validation score, so tests and scripts
can call it; `ptlab-train` (ptlab/cli/train.py) calls it with Hydra's facts about the job
(`RunFacts`). This module imports torch and transformers, which the command line itself does not
need for `--help` or `--cfg`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig

from ptlab.config.difference import config_difference
from ptlab.config.schema import Config, to_object
from ptlab.errors import ConfigError
from ptlab.training.build import SharedBackbone, frozen_backbone, shared_settings
from ptlab.training.checkpoint import (
    config_record,
    find,
    load_training_state,
    record_difference,
)
from ptlab.training.devices import run_device
from ptlab.training.distributed import World, close_world, init_world
from ptlab.training.folder_lock import FolderLocks
from ptlab.training.loop import Ended, OnFailure, train_runs, unheard
from ptlab.training.opened_run import Job, ended_value, record_failed
from ptlab.training.pack_size import auto_pack_size, balanced
from ptlab.training.run_folder import (
    FAILURE_FILE,
    RunFacts,
    is_finished,
    read_json_record,
    read_summary,
    unwritable,
)
from ptlab.training.stages import stage_plan

__all__ = ["Job", "run", "run_jobs"]

log = logging.getLogger("ptlab")


def setup_hardware(config: Config) -> None:
    if config.hardware.num_threads:
        torch.set_num_threads(config.hardware.num_threads)
    if config.hardware.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def run(cfg: DictConfig, run_dir: Optional[Path] = None, facts: Optional[RunFacts] = None) -> float:
    """Train one configuration; returns the best validation value of the task's main metric.
    `run_dir` (else `facts.run_dir`) is its folder; `facts` what Hydra knows of the job (None:
    Hydra did not launch it)."""
    config = to_object(cfg)
    facts = facts or RunFacts()
    facts = dataclasses.replace(facts, run_dir=run_dir or facts.run_dir)
    world = init_world(config.hardware)
    try:
        (best,) = run_jobs([Job(cfg, config, facts)], pack_size=1, world=world, on_failure=OnFailure.RAISE)
        return best
    finally:
        close_world(world)


def run_jobs(
    jobs: Sequence[Job], pack_size: Optional[int], ended: Ended = unheard, world: Optional[World] = None,
    on_failure: OnFailure = OnFailure.RECORD, loaded: Optional[Dict[str, SharedBackbone]] = None,
) -> List[Optional[float]]:  # fmt: skip
    """The jobs (that share one backbone setup) in packs of at most `pack_size` (None: as many as
    fit, `auto_pack_size`) on one backbone loaded once; each one's best validation value (None: it
    failed; at a rung, its value there), and `ended` told as each one ends. Finished jobs are
    skipped before anything loads. Each job's folder is held by this process until the group ends.
    `loaded`: the backbone kept across calls (the groups of one process, successive halving's
    rounds), by setup; loading another setup lets it go."""
    world = world or World()
    with FolderLocks() as locks:  # held until the jobs have ended, however they end
        results: List[Optional[float]] = [None] * len(jobs)
        folders: Dict[int, Path] = {}
        for index, job in enumerate(jobs):
            try:
                folder = prepared_run_dir(job.config, job.facts.run_dir, locks, world)
                finished = reached_summary(folder, job) if job.config.trainer.resume else None
            except Exception as error:  # noqa: BLE001 - a fault in its folder is its own
                if on_failure is OnFailure.RAISE:
                    raise
                record_failed(job.facts.run_dir, error)
                ended(index, None)
                continue
            if finished is not None:  # a rerun sweep skips its finished jobs (and those stopped at a rung)
                results[index] = skipped(folder, job.config, finished)
                ended(index, results[index])
            else:
                folders[index] = folder
        if folders:
            train_held(jobs, folders, pack_size, world, on_failure, ended, results, loaded)
        return results


def train_held(
    jobs: Sequence[Job], folders: Dict[int, Path], pack_size: Optional[int], world: World,
    on_failure: OnFailure, ended: Ended, results: List[Optional[float]],
    loaded: Optional[Dict[str, SharedBackbone]] = None,
) -> None:  # fmt: skip
    """The jobs in their held `folders` trained in packs; a job alone loads its own backbone
    (after its data), a group loads one for all (or takes it from `loaded`)."""
    todo, first = list(folders), jobs[next(iter(folders))].config
    setup_hardware(first)
    setup = json.dumps(shared_settings(first), sort_keys=True, default=str)
    shared = (loaded or {}).get(setup)
    if shared is None and (len(todo) > 1 or loaded is not None):
        if loaded:
            loaded.clear()  # one backbone at a time: another setup's goes before this one loads
        started = time.perf_counter()
        shared = frozen_backbone(first)
        log.info("backbone %s loaded once for %d runs (%.1f s)", first.backbone.name, len(todo),
                 time.perf_counter() - started)  # fmt: skip
        if loaded is not None:
            loaded[setup] = shared
    if len(todo) > 1 and pack_size is None:
        pack_size, why = auto_pack_size(shared.backbone, [jobs[i].config for i in todo], run_device(first.hardware, world))
        log.info("hydra.launcher.pack_size unset: %s", why)
    packs = balanced(todo, -(-len(todo) // (pack_size or 1)))
    if stage_plan(first) is None:  # one pack, as full as the balanced packs, that takes the next job as a member leaves
        packs, slots = [todo], len(packs[0])
    else:  # FPT's partial models change the shared backbone: packs one after another
        slots = None
    for pack in packs:
        values = train_runs([jobs[i] for i in pack], [folders[i] for i in pack], shared, world, on_failure,
                            ended=lambda i, v, pack=pack: ended(pack[i], v), slots=slots)  # fmt: skip
        for index, value in zip(pack, values):
            results[index] = value


def prepared_run_dir(config: Config, run_dir: Optional[Path], locks: FolderLocks, world: World) -> Path:
    """The run's folder (`trainer.resume=<folder>` names it, else `run_dir`), made, held by this
    process (rank 0 holds it for every rank; a folder another process holds is refused before
    anything in it is written), checked writable, and rid of an earlier attempt's failure record."""
    run_dir = Path(run_dir or "outputs/runs/unnamed")
    if isinstance(config.trainer.resume, str) and config.trainer.resume != "auto":
        run_dir = Path(config.trainer.resume)
        if not run_dir.is_dir():
            raise ConfigError(f"trainer.resume={config.trainer.resume!r}: no such run folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise unwritable(run_dir, error) from None
    held_by_main(world, lambda: locks.take(run_dir, config.trainer.lock_timeout_s))
    try:
        probe = run_dir / f".ptlab_write_check.{os.getpid()}"  # one per process: DDP ranks share the folder
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise unwritable(run_dir, error) from None
    if world.is_main:
        (run_dir / FAILURE_FILE).unlink(missing_ok=True)  # an earlier attempt's; this one may succeed
    return run_dir


def held_by_main(world: World, take: Callable[[], None]) -> None:
    """`take()` the run folder on rank 0; every rank raises rank 0's refusal, so no rank writes in
    a folder another process holds."""
    refused: Optional[ConfigError] = None
    if world.is_main:
        try:
            take()
        except ConfigError as error:
            refused = error
    refused = world.gather([refused])[0][0]
    if refused is not None:
        raise refused


def skipped(run_dir: Path, config: Config, finished: Dict[str, Any]) -> float:
    value, metric = ended_value(config, finished), config.task.main_metric
    if finished["status"] == "stopped":
        log.info("%s already stopped at rung %d, step %d (validation %s = %.4f): skipped", run_dir,
                 finished["rung"], finished["steps"], metric, value)  # fmt: skip
    else:
        log.info("%s already finished (best validation %s = %.4f): skipped; trainer.resume=false trains "
                 "it again", run_dir, metric, value)  # fmt: skip
    return value


def reached_summary(run_dir: Path, job: Job) -> Optional[Dict[str, Any]]:
    """The folder's summary when this round has nothing to train for the job: it finished
    (`finished_summary`), or a successive-halving round stops it at a rung it already stopped at,
    or passed, with this config."""
    finished = finished_summary(run_dir, job.config)
    if finished is not None or job.rung is None:
        return finished
    summary = read_summary(run_dir)
    if summary is None or summary.get("status") != "stopped" or summary.get("steps", 0) < job.rung.step:
        return None
    last = find(run_dir / "checkpoints" / "last")
    if last is None:
        return None
    saved = load_training_state(last)["prompt_config"].get("config")
    return summary if config_difference(saved, dataclasses.asdict(job.config)) is None else None


def finished_summary(run_dir: Path, config: Config) -> Optional[Dict[str, Any]]:
    """The run folder's summary when its run finished with this method, backbone and task (and
    `trainer.max_steps` asks for no more steps than it trained: a larger one continues it), else
    None: never run, cut short, failed, or another setup (whose resume then says why it cannot)."""
    summary = read_summary(run_dir)
    record = read_json_record(run_dir / "checkpoints" / "best" / "prompt_config.json")
    if not is_finished(summary) or record is None:
        return None
    same = (
        record_difference(record, config_record(config)) is None
        and config_difference(record.get("config"), dataclasses.asdict(config)) is None
    )
    max_steps = config.trainer.max_steps
    longer = (
        max_steps is not None and not summary.get("stopped_early") and max_steps > summary.get("steps", 0)
    )
    return summary if same and not longer else None

"""One training job: its run folder, the pipeline, the trainer and the summary.

`run(cfg)` is a plain function returning the best validation score, so tests and scripts can call
it directly; `ptlab-train` (ptlab/cli/train.py) calls it once the command line is parsed, with
Hydra's facts about the job (`RunFacts`). This module imports torch and transformers, which the
command line itself does not need for `--help` or `--cfg`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from omegaconf import DictConfig

from ptlab.config.schema import Config, to_object
from ptlab.errors import ConfigError
from ptlab.training.checkpoint import config_difference, config_record, record_difference
from ptlab.training.distributed import World, close_world, init_world
from ptlab.training.folder_lock import FolderLocks
from ptlab.training.run_folder import (
    FAILURE_FILE,
    RunFacts,
    is_finished,
    read_json_record,
    read_summary,
    unwritable,
)
from ptlab.training.train_runs import PackedJob, train_runs

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
    world = init_world(config.hardware)
    try:
        with FolderLocks() as locks:  # held until the run has ended, however it ends
            return train_in(prepared_run_dir(config, run_dir or facts.run_dir, locks, world), config, cfg, world, facts)
    finally:
        close_world(world)


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


def train_in(run_dir: Path, config: Config, cfg: DictConfig, world: World, facts: RunFacts) -> float:
    """The run in its (writable) folder: skipped when it finished before, else a pack of one:
    built, recorded (config snapshots, log file: only now, so a run that fails its checks leaves
    the folder as it was), trained and summarised (ptlab/training/train_runs.py)."""
    finished = finished_summary(run_dir, config) if config.trainer.resume else None
    if finished is not None:  # a rerun sweep skips its finished jobs
        return skipped(run_dir, config, finished)
    setup_hardware(config)
    (best,) = train_runs([PackedJob(cfg, config, facts)], [run_dir], None, world, alone=True)
    return best


def skipped(run_dir: Path, config: Config, finished: Dict[str, Any]) -> float:
    best = finished["best"][config.task.main_metric]
    log.info("%s already finished (best validation %s = %.4f): skipped; trainer.resume=false trains "
             "it again", run_dir, config.task.main_metric, best)  # fmt: skip
    return best


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

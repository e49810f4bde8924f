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
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from omegaconf import DictConfig

from ptlab.config.schema import Config, to_object
from ptlab.errors import ConfigError
from ptlab.provenance import code_version
from ptlab.training.build import SharedBackbone, build
from ptlab.training.checkpoint import config_difference, config_record, record_difference
from ptlab.training.distributed import World, close_world, init_world
from ptlab.training.folder_lock import FolderLocks
from ptlab.training.run_folder import (
    FAILURE_FILE,
    RunFacts,
    RunLog,
    is_finished,
    read_json_record,
    read_summary,
    save_snapshots,
    unwritable,
)
from ptlab.training.tracking import Tracker, run_name, wandb_config
from ptlab.training.trainer import Trainer

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
            folder = prepared_run_dir(config, run_dir or facts.run_dir, locks, world)
            with RunLog() as run_log:
                return train_in(folder, config, cfg, world, facts, run_log)
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


def train_in(
    run_dir: Path, config: Config, cfg: DictConfig, world: World, facts: RunFacts, run_log: RunLog
) -> float:
    """The run in its (writable) folder: skipped when it finished before, else built, recorded
    (config snapshots, log file: only now, so a run that fails its checks leaves the folder as it
    was), trained and summarised."""
    finished = finished_summary(run_dir, config) if config.trainer.resume else None
    if finished is not None:  # a rerun sweep skips its finished jobs
        return skipped(run_dir, config, finished)
    setup_hardware(config)
    opened = open_run(run_dir, config, cfg, world, facts, run_log)
    try:
        return close_run(opened, opened.trainer.fit())
    finally:
        opened.tracker.finish()


def skipped(run_dir: Path, config: Config, finished: Dict[str, Any]) -> float:
    best = finished["best"][config.task.main_metric]
    log.info("%s already finished (best validation %s = %.4f): skipped; trainer.resume=false trains "
             "it again", run_dir, config.task.main_metric, best)  # fmt: skip
    return best


@dataclasses.dataclass
class OpenRun:
    """A run built, resumed where its folder says, recorded and tracking: ready to train."""

    run_dir: Path
    config: Config
    trainer: Trainer
    tracker: Tracker
    started: float  # perf_counter when its building began
    load_seconds: float


def open_run(
    run_dir: Path,
    config: Config,
    cfg: DictConfig,
    world: World,
    facts: RunFacts,
    run_log: RunLog,
    shared: Optional[SharedBackbone] = None,
    started: Optional[float] = None,
) -> OpenRun:
    """Build the run (on `shared`, a backbone loaded for it and others), open its tracker, resume
    it from its folder's checkpoint if it has one (a checkpoint that does not fit stops here), then
    write its config snapshots and start its log and W&B run."""
    started = time.perf_counter() if started is None else started
    pipeline = build(config, world, shared=shared)
    load_seconds = time.perf_counter() - started
    tracker = open_tracker(run_dir, config, cfg, world, facts)
    try:
        trainer = Trainer(config=config, pipeline=pipeline, tracker=tracker, run_dir=run_dir)
        if not (config.trainer.resume and trainer.resume(run_dir)):
            tracker.truncate_after(-1)  # starting over in a used folder: drop its old events
        record_start(run_dir, cfg, world, facts, run_log)
        tracker.start()
    except BaseException:
        tracker.finish()
        raise
    names = (config.method.run_label, config.backbone.name, config.task.name)
    log.info("%s on %s/%s: %d trainable parameters, %d steps, run folder %s",
             *names, trainer.num_trainable, trainer.total_steps, run_dir)  # fmt: skip
    return OpenRun(run_dir, config, trainer, tracker, started, load_seconds)


def close_run(run: OpenRun, summary: Dict[str, Any]) -> float:
    """A trained run's summary completed and recorded (summary.json, W&B, the prompt artifact);
    returns its best validation value. The caller finishes its tracker."""
    config, tracker = run.config, run.tracker
    summary.update(
        status="finished",
        method=config.method.run_label,
        backbone=config.backbone.name,
        task=config.task.name,
        seed=config.seed,
        load_seconds=run.load_seconds,
        wall_seconds=time.perf_counter() - run.started,
        wandb=tracker.wandb_info(),
        code=code_version(),
    )
    tracker.summary(summary)
    if config.logger.log_prompt:
        name = f"prompt-{config.method.run_label}-{config.task.name}-{tracker.run_id()}"
        metadata = {"best": summary["best"], "backbone": config.backbone.name, "seed": config.seed}
        tracker.log_prompt(run.run_dir / "checkpoints" / "best", name, metadata)
    metric, baseline = config.task.main_metric, summary["baseline"]
    best = summary["best"][metric]
    log.info("best validation %s = %.4f (step %s; %s: %.4f); summary: %s", metric, best, summary["best"]["step"],
             baseline["name"], baseline[metric], run.run_dir / "summary.json")  # fmt: skip
    return best


def record_start(run_dir: Path, cfg: DictConfig, world: World, facts: RunFacts, run_log: RunLog) -> None:
    """The run has passed every check (config, data, model, checkpoint): its config snapshots and
    log file go into the folder now, not before (only when Hydra launched it: they are Hydra's)."""
    if facts.hydra_config is None:
        return
    if world.is_main:
        save_snapshots(run_dir, cfg, facts.hydra_config)
    suffix = "" if world.rank == 0 else f"_rank{world.rank}"
    run_log.start(run_dir / f"{facts.job_name}{suffix}.log")


def open_tracker(run_dir: Path, config: Config, cfg: DictConfig, world: World, facts: RunFacts) -> Tracker:
    """The run's metrics log and W&B run (rank 0 only), named and grouped for the sweep it is in."""
    return Tracker(
        run_dir,
        config.logger,
        enabled=world.is_main,
        wandb_init={
            "config": wandb_config(cfg, config, facts.experiment),
            "group": config.logger.group or facts.group,
            "job_type": config.method.run_label,
            "name": run_name(facts.overrides, facts.swept),
            "tags": [config.method.run_label, config.backbone.name, config.task.name, *config.logger.tags],
        },
    )


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

"""One run opened and closed: built (on a shared backbone or its own), resumed where its folder
says, recorded and tracking; at its end, its summary recorded, or its failure. Solo and packed
runs alike."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import DictConfig

from ptlab.config.schema import Config
from ptlab.provenance import code_version
from ptlab.training.build import SharedBackbone, build
from ptlab.training.distributed import World
from ptlab.training.run_folder import RunFacts, RunLog, record_failure, save_snapshots
from ptlab.training.tracking import Tracker, run_name, wandb_config
from ptlab.training.trainer import Trainer

log = logging.getLogger("ptlab")


@dataclasses.dataclass(frozen=True)
class Rung:
    """Where successive halving (ptlab/sweep/halving.py) stops a job in this round: rung `number`
    of `of`, after `step` steps. Its lr schedule stays its full run's, so a run promoted to the end
    equals the run trained without the scheduler."""

    number: int
    of: int
    step: int


@dataclasses.dataclass
class Job:
    """A job to train: its composed config (as Hydra gave it, and validated), what Hydra knows
    of it (its folder among it), and the rung it stops at in this round (None: its end)."""

    cfg: DictConfig
    config: Config
    facts: RunFacts
    rung: Optional[Rung] = None


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


def ended_value(config: Config, summary: Dict[str, Any]) -> float:
    """What an ended run reports: its best validation value, or its value at the rung it stopped at."""
    return summary["final" if summary["status"] == "stopped" else "best"][config.task.main_metric]


def close_run(run: OpenRun, summary: Dict[str, Any], rung: Optional[Rung] = None) -> float:
    """A trained run's summary completed and recorded (summary.json, W&B, the prompt artifact);
    returns its best validation value. Stopped at a successive-halving `rung`: its summary says so
    (`status: stopped`, the rung, its steps), and it returns its validation value there. The
    caller finishes its tracker."""
    config, tracker = run.config, run.tracker
    if rung is not None:
        summary.update(rung=rung.number, rungs=rung.of)
    summary.update(
        status="finished" if rung is None else "stopped",
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
    metric, baseline, value = config.task.main_metric, summary["baseline"], ended_value(config, summary)
    if rung is not None:
        log.info("stopped at rung %d of %d (step %d): validation %s = %.4f; if promoted, it goes on from here; "
                 "summary: %s", rung.number, rung.of, summary["steps"], metric, value, run.run_dir / "summary.json")  # fmt: skip
        return value
    if config.logger.log_prompt:
        name = f"prompt-{config.method.run_label}-{config.task.name}-{tracker.run_id()}"
        metadata = {"best": summary["best"], "backbone": config.backbone.name, "seed": config.seed}
        tracker.log_prompt(run.run_dir / "checkpoints" / "best", name, metadata)
    log.info("best validation %s = %.4f (step %s; %s: %.4f); summary: %s", metric, value, summary["best"]["step"],
             baseline["name"], baseline[metric], run.run_dir / "summary.json")  # fmt: skip
    return value


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


def record_failed(run_dir: Optional[Path], error: Exception) -> None:
    """A member's one-line error on stderr and in its folder; the other members go on."""
    print(f"ptlab: error: {run_dir}: {error}", file=sys.stderr)
    if run_dir is None:
        return
    try:
        record_failure(run_dir, error)
    except OSError as unrecorded:  # the folder itself is the fault: say so, and go on
        print(f"ptlab: error: {run_dir}: its failure could not be recorded there ({unrecorded})", file=sys.stderr)

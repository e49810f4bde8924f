"""The entrypoint: compose config -> build backbone, method, data, tracker -> train -> summarise.

`ptlab-train` and `python -m ptlab.train` are the same command. `run(cfg)` is a plain function
returning the best validation score, so tests and Optuna sweeps can call it directly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ptlab.checkpoint import prompt_identity
from ptlab.config import Config, register_configs, to_object
from ptlab.distributed import World, close_world, init_world, launched_world
from ptlab.errors import ConfigError, TrainingFault
from ptlab.pipeline import build
from ptlab.preemption import Preempted
from ptlab.run_record import FAILURE_FILE, RunLog, record_failure, save_snapshots
from ptlab.tracking import Tracker, run_name, wandb_config
from ptlab.trainer import Trainer, seed_everything

log = logging.getLogger("ptlab")

register_configs()


def run_stamp() -> str:
    """The run folder's name: the time to the microsecond (no two launches collide), or, for the
    ranks of one torchrun launch, one name they all derive alike (their launcher's run id and pid)."""
    if launched_world().size > 1:
        return f"ddp/{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}-{os.getppid()}"
    return datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")


# conf/config.yaml names the run folder with this
OmegaConf.register_new_resolver("ptlab_stamp", run_stamp, use_cache=True, replace=True)
# the config tree lives at the repository root (an editable install: `pip install -e .`)
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def hydra_facts() -> Dict[str, Any]:
    """Run folder, sweep name and overrides from Hydra, when Hydra launched us."""
    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    output_dir = OmegaConf.select(hydra_cfg, "runtime.output_dir", default=None, throw_on_missing=False)
    experiment = OmegaConf.select(hydra_cfg, "runtime.choices.experiment", default=None)
    return {
        "run_dir": Path(output_dir) if output_dir else None,
        # W&B group: the experiment's name, else the sweep folder, so all jobs of one multirun share it
        "group": experiment or ("_".join(Path(hydra_cfg.sweep.dir).parts[-2:]) if multirun else None),
        "experiment": experiment,
        "overrides": list(hydra_cfg.overrides.task),
        "swept": swept_keys(hydra_cfg) if multirun else [],
    }


def swept_keys(hydra_cfg: DictConfig) -> List[str]:
    """The keys a multirun varies: its sweeper's params and the command-line overrides that list
    several values (the sweep's multirun.yaml keeps them as typed)."""
    keys = [str(k) for k in (OmegaConf.select(hydra_cfg, "sweeper.params", default=None) or {})]
    try:
        typed = OmegaConf.load(Path(hydra_cfg.sweep.dir) / "multirun.yaml").hydra.overrides.task
    except (OSError, OmegaConfBaseException):
        typed = []
    for item in typed:
        key, _, value = str(item).partition("=")
        if "," in value or value.startswith(("range(", "choice(", "interval(", "glob(")):
            keys.append(key.lstrip("+~"))
    return list(dict.fromkeys(keys))


def setup_hardware(config: Config) -> None:
    if config.hardware.num_threads:
        torch.set_num_threads(config.hardware.num_threads)
    if config.hardware.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def run(cfg: DictConfig, run_dir: Optional[Path] = None) -> float:
    """Train one configuration; returns the best validation value of the task's main metric."""
    config = to_object(cfg)
    world = init_world(config.hardware)
    try:
        return run_config(config, cfg, run_dir, world)
    finally:
        close_world(world)


def run_config(config: Config, cfg: DictConfig, run_dir: Optional[Path], world: World) -> float:
    facts = hydra_facts()
    run_dir = Path(run_dir or facts.get("run_dir") or "outputs/runs/unnamed")
    if isinstance(config.trainer.resume, str) and config.trainer.resume != "auto":
        run_dir = Path(config.trainer.resume)
        if not run_dir.is_dir():
            raise ConfigError(f"trainer.resume={config.trainer.resume!r}: no such run folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ".ptlab_write_check").touch()
        (run_dir / ".ptlab_write_check").unlink()
    except OSError as error:
        raise ConfigError(f"cannot write the run folder {run_dir}: {error.strerror or error}; "
                          "choose another one with hydra.run.dir=...") from None  # fmt: skip
    (run_dir / FAILURE_FILE).unlink(missing_ok=True)  # an earlier attempt's; this one may succeed
    with RunLog() as run_log:
        return train_in(run_dir, config, cfg, world, facts, run_log)


def train_in(
    run_dir: Path, config: Config, cfg: DictConfig, world: World, facts: Dict[str, Any], run_log: RunLog
) -> float:
    """The run in its (writable) folder: skipped when it finished before, else built, recorded
    (config snapshots, log file: only now, so a run that fails its checks leaves the folder as it
    was), trained and summarised."""
    finished = finished_summary(run_dir, config) if config.trainer.resume else None
    if finished is not None:  # a rerun sweep skips its finished jobs
        best = finished["best"][config.task.main_metric]
        log.info("%s already finished (best validation %s = %.4f): skipped; trainer.resume=false trains "
                 "it again", run_dir, config.task.main_metric, best)  # fmt: skip
        return best
    setup_hardware(config)
    seed_everything(config.seed)
    started = time.perf_counter()
    pipeline = build(config, world)
    load_seconds = time.perf_counter() - started
    if HydraConfig.initialized():
        if world.is_main:
            save_snapshots(run_dir, cfg)
        suffix = "" if world.rank == 0 else f"_rank{world.rank}"
        run_log.start(run_dir / f"{HydraConfig.get().job.name}{suffix}.log")
    tracker = open_tracker(run_dir, config, cfg, world, facts)
    try:
        trainer = Trainer(config=config, pipeline=pipeline, tracker=tracker, run_dir=run_dir)
        if not (config.trainer.resume and trainer.resume(run_dir)):
            tracker.truncate_after(-1)  # starting over in a used folder: drop its old events
        names = (config.method.run_label, config.backbone.name, config.task.name)
        log.info("%s on %s/%s: %d trainable parameters, %d steps, run folder %s",
                 *names, trainer.num_trainable, trainer.total_steps, run_dir)  # fmt: skip
        summary = trainer.fit()
        summary.update(
            status="finished",
            method=config.method.run_label,
            backbone=config.backbone.name,
            task=config.task.name,
            seed=config.seed,
            load_seconds=load_seconds,
            wall_seconds=time.perf_counter() - started,
            wandb=tracker.wandb_info(),
        )
        tracker.summary(summary)
        if config.logger.log_prompt:
            name = f"prompt-{config.method.run_label}-{config.task.name}-{tracker.run_id()}"
            metadata = {"best": summary["best"], "backbone": config.backbone.name, "seed": config.seed}
            tracker.log_prompt(run_dir / "checkpoints" / "best", name, metadata)
    finally:
        tracker.finish()
    best = summary["best"][config.task.main_metric]
    log.info(
        "best validation %s = %.4f (step %s); summary: %s",
        config.task.main_metric,
        best,
        summary["best"]["step"],
        run_dir / "summary.json",
    )
    return best


def open_tracker(
    run_dir: Path, config: Config, cfg: DictConfig, world: World, facts: Dict[str, Any]
) -> Tracker:
    """The run's metrics log and W&B run (rank 0 only), named and grouped for the sweep it is in."""
    return Tracker(
        run_dir,
        config.logger,
        enabled=world.is_main,
        wandb_init={
            "config": wandb_config(cfg, config, facts.get("experiment")),
            "group": config.logger.group or facts.get("group"),
            "job_type": config.method.run_label,
            "name": run_name(facts.get("overrides", []), facts.get("swept", [])),
            "tags": [config.method.run_label, config.backbone.name, config.task.name, *config.logger.tags],
        },
    )


def finished_summary(run_dir: Path, config: Config) -> Optional[Dict[str, Any]]:
    """The run folder's summary when its run finished with this method, backbone and task (and
    `trainer.max_steps` asks for no more steps than it trained: a larger one continues it), else
    None: never run, cut short, failed, or another setup (whose resume then says why it cannot)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        record = json.loads((run_dir / "checkpoints" / "best" / "prompt_config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("status") != "finished":
        return None
    same = prompt_identity(record.get("method")) == prompt_identity(dataclasses.asdict(config.method)) and (
        record.get("backbone"),
        record.get("task"),
    ) == (config.backbone.name, config.task.name)
    max_steps = config.trainer.max_steps
    longer = (
        max_steps is not None and not summary.get("stopped_early") and max_steps > summary.get("steps", 0)
    )
    return summary if same and not longer else None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def task(cfg: DictConfig) -> Optional[float]:
    """One job: Hydra composes `cfg` (per job in a multirun) and calls this."""
    try:
        return run(cfg)
    except (ConfigError, TrainingFault) as error:  # after a TrainingFault the last good checkpoint stays
        print(f"ptlab: error: {error}", file=sys.stderr)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            record_failure(Path(HydraConfig.get().runtime.output_dir), error)
            return None  # the sweep goes on; Optuna records a trial without a value as failed
        sys.exit(2 if isinstance(error, ConfigError) else 1)
    except Preempted as stop:  # the checkpoint is written; the same command (or a requeue) resumes
        print(f"ptlab: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)


# lines of Hydra's reports that name internals, not the mistake
NOISE = (
    "full_key:",
    "object_type=",
    "Config search path",
    "provider=",
    "reference_type=",
    "To append to your config",
)


def one_line(error: BaseException) -> str:
    """Hydra's multi-line message and its causes (an unknown group value with its options, a
    misspelled key, a value of the wrong type) folded into one line, internal schema entries and
    search paths left out."""
    parts = []
    while error is not None:
        for line in str(error).splitlines():
            line = line.strip()
            if not line or line.endswith("_schema") or line.startswith(NOISE) or line in parts:
                continue
            parts.append(line)
        error = error.__cause__
    return " ".join(parts).replace(" Available options in", "; available in")


def main() -> None:
    """`ptlab-train`: Hydra's command line, whose own errors (an unknown group value, a misspelled
    key, a bad type) print like ptlab's: `ptlab: error:`, one line, exit 2. PTLAB_DEBUG=1 shows
    Hydra's full report instead. An Optuna sweep tolerates failed trials unless told otherwise."""
    if "hydra/sweeper=optuna" in sys.argv and not any("max_failure_rate" in arg for arg in sys.argv):
        sys.argv.append("hydra.sweeper.max_failure_rate=1.0")  # a failed trial must not end the study
    if os.environ.get("PTLAB_DEBUG") == "1":
        task()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing them
    try:
        task()
    except (HydraException, OmegaConfBaseException) as error:
        print(f"ptlab: error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # Hydra makes the run folder before ptlab runs: not a directory, read-only
        if error.filename is None:
            raise
        print(f"ptlab: error: cannot write {error.filename} ({error.strerror}): choose another folder with "
              "hydra.run.dir=... (hydra.sweep.dir=... for a multirun)", file=sys.stderr)  # fmt: skip
        sys.exit(2)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # enter through the importable module, not __main__, so launchers that pickle the task
    # function (submitit) pickle a reference to it rather than this script's globals
    from ptlab.train import main as entry

    entry()

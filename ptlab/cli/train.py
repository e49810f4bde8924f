"""`ptlab-train`: Hydra's command line (compose the config, sweep, launch), ptlab's errors in one
line, and ptlab's own `--help`. `python -m ptlab.cli.train` is the same command.

The job itself (run folder, pipeline, trainer, summary) is `ptlab.training.job.run`, imported only when a
run starts, so `--help` and `--cfg job` answer without loading transformers or the data stack. Hydra's
runtime facts about the job are read here, once (`run_facts`), and passed down: no module below
this one reads Hydra's process-wide state.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ptlab.config.compose import CONF_DIR, one_line, register_schemas
from ptlab.config.renamed import check_override_names
from ptlab.errors import ConfigError, TrainingFault
from ptlab.training.preemption import Preempted
from ptlab.training.run_folder import RunFacts, record_failure

register_schemas()


def run_facts() -> RunFacts:
    """This job's facts from Hydra: its folder, its W&B group (the experiment's name, else the
    sweep's folder, so all jobs of one multirun share it), its overrides and what it needs to
    write `.hydra/`."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    output_dir = OmegaConf.select(hydra_cfg, "runtime.output_dir", default=None, throw_on_missing=False)
    experiment = OmegaConf.select(hydra_cfg, "runtime.choices.experiment", default=None)
    return RunFacts(
        run_dir=Path(output_dir) if output_dir else None,
        group=experiment or ("_".join(Path(hydra_cfg.sweep.dir).parts[-2:]) if multirun else None),
        experiment=experiment,
        overrides=list(hydra_cfg.overrides.task),
        swept=swept_keys(hydra_cfg) if multirun else [],
        multirun=multirun,
        job_name=hydra_cfg.job.name,
        hydra_config=HydraConfig.instance().cfg,
    )


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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def task(cfg: DictConfig) -> Optional[float]:
    """One job: Hydra composes `cfg` (per job in a multirun) and calls this."""
    from ptlab.training.job import run

    facts = run_facts()
    try:
        return run(cfg, facts=facts)
    except (ConfigError, TrainingFault) as error:  # after a TrainingFault the last good checkpoint stays
        print(f"ptlab: error: {error}", file=sys.stderr)
        if facts.multirun:
            record_failure(facts.run_dir, error)
            return None  # the sweep goes on; Optuna records a trial without a value as failed
        sys.exit(2 if isinstance(error, ConfigError) else 1)
    except Preempted as stop:  # the checkpoint is written; the same command (or a requeue) resumes
        print(f"ptlab: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)


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
        check_override_names([arg for arg in sys.argv[1:] if not arg.startswith("-")])
        task()
    except (HydraException, OmegaConfBaseException, ConfigError) as error:  # ConfigError: a launcher's
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
    from ptlab.cli.train import main as entry

    entry()

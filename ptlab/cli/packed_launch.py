"""`hydra/launcher=packed`: a multirun's jobs trained in packs (ptlab/training/pack.py).

Hydra's launchers call the task function once per job; this one composes every job's config
(as Hydra's basic launcher does: sweep config, job number, output folder), groups the jobs that
can share a backbone (ptlab/training/packing.py), says how it packed them, and trains each group
in packs, in this process or as one SLURM job per group through submitit. Each job still gets
what Hydra gives a job: its folder, its `.hydra/` snapshots (written by ptlab once it starts), its
overrides, and a `JobReturn` whose value is its best validation score (None when it failed, so an
Optuna trial records a failure), and the sweep's per-job callbacks (`on_job_start`, `on_job_end`)
see it start and end as under Hydra's basic launcher (ptlab/cli/job_hooks.py).
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ptlab.cli.job_hooks import JobHooks
from ptlab.config.schema import to_object
from ptlab.errors import ConfigError

log = logging.getLogger("ptlab")


@dataclass
class PackedLauncherConf:
    """`hydra.launcher.*` of `hydra/launcher=packed`."""

    _target_: str = "hydra_plugins.ptlab_launcher.packed_launcher.PackedLauncher"
    pack_size: Optional[int] = None  # most runs per pack; null: as many as fit the device (logged)
    # empty: packs train in this process; else the keys of Hydra's submitit launcher (partition,
    # timeout_min, gpus_per_node, ...; `cluster: local` runs them as local processes): one job per group
    submitit: Dict[str, Any] = field(default_factory=dict)


def check_launcher(settings: DictConfig) -> Optional[int]:
    """The pack size asked for (None: automatic); a bad one is one line before anything runs."""
    size = settings.get("pack_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ConfigError(
            f"hydra.launcher.pack_size={size!r}: give a whole number of runs per pack, 1 or more "
            "(null: as many as fit the device)"
        )
    return size


def prepared_job(context: HydraContext, config: DictConfig, overrides: Sequence[str], number: int):
    """One job's sweep config (`hydra:` included), Hydra facts and JobReturn (its `cfg` the task's
    config), as Hydra's basic launcher and `run_job` make them."""
    from ptlab.cli.train import run_facts

    sweep_config = context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = number
        sweep_config.hydra.job.num = number
    HydraConfig.instance().set_config(sweep_config)
    output_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
    with read_write(sweep_config.hydra.runtime), open_dict(sweep_config.hydra.runtime):
        sweep_config.hydra.runtime.output_dir = os.path.abspath(output_dir)
    HydraConfig.instance().set_config(sweep_config)
    task_cfg = copy.deepcopy(sweep_config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    facts = run_facts()
    job_return = JobReturn(
        overrides=list(overrides),
        cfg=task_cfg,
        hydra_cfg=copy.deepcopy(HydraConfig.instance().cfg),
        working_dir=os.getcwd(),
        task_name=sweep_config.hydra.job.name,
    )
    return sweep_config, facts, job_return


def launch(
    settings: DictConfig, context: HydraContext, config: DictConfig, job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int, task_function: Optional[TaskFunction] = None,
) -> List[JobReturn]:  # fmt: skip
    """Compose, group, report and train the jobs; one JobReturn per job, in order, each job seen
    by the sweep's callbacks as it starts and ends (ptlab/cli/job_hooks.py)."""
    from ptlab.training.packed_job import PackedJob, failed
    from ptlab.training.packing import check_packable, group_jobs, packing_report

    setup_globals()
    pack_size = check_launcher(settings)
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    hooks = JobHooks(context.callbacks, task_function)
    jobs, usable = [], []
    for offset, overrides in enumerate(job_overrides):
        sweep_config, facts, job_return = prepared_job(context, config, overrides, initial_job_idx + offset)
        hooks.add(sweep_config, job_return)
        log.info("\t#%d : %s", initial_job_idx + offset, " ".join(filter_overrides(overrides)))
        try:
            jobs.append(PackedJob(job_return.cfg, to_object(job_return.cfg), facts))
            usable.append(offset)
        except ConfigError as error:  # this job's own settings: it fails alone
            hooks.started([offset])
            failed(facts.run_dir, error)
            hooks.ended(offset, None)
    configure_log(config.hydra.job_logging, config.hydra.verbose)
    check_packable([job.config for job in jobs])
    groups = group_jobs([job.config for job in jobs])
    sizes = [pack_size or len(group.jobs) for group in groups]
    log.info("hydra/launcher=packed: %d jobs in %d groups sharing a backbone setup%s", len(jobs), len(groups),
             "" if pack_size is None else f", packs of at most {pack_size}")  # fmt: skip
    for line in packing_report(groups, sizes, [offset + initial_job_idx for offset in usable]):
        log.info("  %s", line)
    if pack_size is None:
        log.info("  (a group splits into packs of the size that fits its device once its backbone is loaded)")
    grouped = [([jobs[i] for i in group.jobs], [usable[i] for i in group.jobs]) for group in groups]
    run_groups(grouped, pack_size, settings, Path(str(config.hydra.sweep.dir)), hooks)
    return hooks.returns


def run_groups(
    groups: List[Tuple[List[Any], List[int]]], pack_size: Optional[int], settings: DictConfig, sweep_dir: Path,
    hooks: JobHooks,
) -> None:  # fmt: skip
    """Train each group (its jobs, and their numbers in `hooks`) here, its jobs' callbacks told as
    each starts and ends, or as one submitit job per group (waited for)."""
    from ptlab.training.packed_job import run_group
    from ptlab.training.preemption import Preempted

    submitit = settings.get("submitit")
    if submitit:
        submitted(groups, pack_size, OmegaConf.to_container(submitit, resolve=True), sweep_dir, hooks)
        return
    try:
        for group, numbers in groups:
            hooks.started(numbers)
            hooks.ended_if_untold(numbers, run_group(group, pack_size, hooks.ender(numbers)))
    except Preempted as stop:  # each member's checkpoint is written; the same command resumes
        print(f"ptlab: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)


def submitted(
    groups: List[Tuple[List[Any], List[int]]], pack_size: Optional[int], params: Dict[str, Any], sweep_dir: Path,
    hooks: JobHooks,
) -> None:  # fmt: skip
    """One submitit job per group, with the keys Hydra's submitit launcher takes (its logs under
    the sweep's `.submitit/`, as Hydra's); waits for all. The callbacks stay in this process: a
    group's jobs start when it is submitted and end when its submitit job returns."""
    import submitit

    from ptlab.training.packed_job import run_group

    params = dict(params)
    cluster = params.pop("cluster", None)
    folder = params.pop("submitit_folder", str(sweep_dir / ".submitit" / "%j"))
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    base = {"timeout_min", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "name",
            "stderr_to_stdout"}  # fmt: skip
    prefix = executor.cluster
    executor.update_parameters(
        **{key if key in base else f"{prefix}_{key}": value for key, value in params.items()}
    )
    for _, numbers in groups:
        hooks.started(numbers)
    submitted_jobs = [executor.submit(run_group, group, pack_size) for group, _ in groups]
    log.info("submitted %d pack jobs through submitit (%s): %s", len(submitted_jobs), executor.cluster,
             ", ".join(job.job_id for job in submitted_jobs))  # fmt: skip
    for (_, numbers), job in zip(groups, submitted_jobs):
        hooks.ended_if_untold(numbers, job.result())

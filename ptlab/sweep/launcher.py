"""`hydra/launcher=packed`: a multirun's jobs trained in packs (ptlab/training/loop.py).

Hydra's launchers call the task function once per job; this one composes every job's config
(as Hydra's basic launcher does: sweep config, job number, output folder), groups the jobs that
can share a backbone (ptlab/sweep/grouping.py), says how it packed them, and trains each group
in packs, in this process or as one SLURM job per group through submitit. Each job still gets
what Hydra gives a job: its folder, its `.hydra/` snapshots (written by ptlab once it starts), its
overrides, and a `JobReturn` whose value is its best validation score (None when it failed, so an
Optuna trial records a failure), and the sweep's per-job callbacks (`on_job_start`, `on_job_end`)
see it start and end as under Hydra's basic launcher (ptlab/sweep/hooks.py).
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ptlab.config.schema import to_object
from ptlab.errors import ConfigError
from ptlab.sweep.halving import Scheduler, settings_of
from ptlab.sweep.hooks import JobHooks
from ptlab.sweep.places import PlacedPack, Workers, on_submitit
from ptlab.sweep.ray_place import SETTINGS as RAY_SETTINGS

if TYPE_CHECKING:  # the training stack loads only when a ptlab sweep starts
    from ptlab.training.run_folder import RunFacts

log = logging.getLogger("ptlab")


@dataclass
class PackedLauncherConf:
    """`hydra.launcher.*` of `hydra/launcher=packed`."""

    _target_: str = "hydra_plugins.ptlab_launcher.packed_launcher.PackedLauncher"
    pack_size: Optional[int] = None  # most runs per pack; null: as many as fit the device (logged)
    # packs at once on this machine, each in a process that owns one GPU (on the CPU they split the
    # cores); null: the visible GPUs, 1 without a GPU (1: packs train in this process, one by one)
    workers: Optional[int] = None
    # the keys of Hydra's submitit launcher (partition, timeout_min, gpus_per_node, array_parallelism,
    # ...; `cluster: local` runs them as local processes): one submitit job per pack
    submitit: Dict[str, Any] = field(default_factory=dict)
    # a Ray cluster (address, num_gpus, num_cpus, memory, runtime_env, max_retries): one task per pack
    ray: Dict[str, Any] = field(default_factory=dict)
    # false: a pack holds runs of one prompt width (`MethodConfig.row_layout`), so none pays for
    # another's padding and a member equals its run alone bit for bit where its packmates read the
    # same batches; true: widths share packs (fewer pack steps on a launch-bound GPU; a member then
    # equals its run alone to rounding, which training can amplify)
    mix_widths: bool = False
    # successive halving (ptlab/sweep/halving.py): {metric, eta, rungs, within, average}; null: off.
    # Any: OmegaConf cannot merge a dict into a typed None; halving.settings_of checks it
    halving: Any = None


def check_launcher(settings: DictConfig) -> Optional[int]:
    """The pack size asked for (None: automatic); a bad one, or bad workers, is one line before
    anything runs."""
    for key, what, unset in (("pack_size", "runs per pack", "as many as fit the device"),
                             ("workers", "packs at once on this machine", "one per visible GPU")):  # fmt: skip
        value = settings.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"hydra.launcher.{key}={value!r}: give a whole number of {what}, 1 or more (null: {unset})")
    unknown = sorted(set(settings.get("ray") or {}) - RAY_SETTINGS)
    if unknown:
        raise ConfigError(f"hydra.launcher.ray.{unknown[0]} is not a setting of hydra.launcher.ray "
                          f"(it takes {', '.join(sorted(RAY_SETTINGS))})")  # fmt: skip
    if not isinstance(settings.get("mix_widths", False), bool):
        raise ConfigError(f"hydra.launcher.mix_widths={settings.get('mix_widths')!r}: give true or false")
    settings_of(settings.get("halving"))
    places = [key for key in ("submitit", "ray") if settings.get(key)]
    places += ["workers"] if (settings.get("workers") or 1) > 1 else []
    if len(places) > 1:
        raise ConfigError(f"hydra.launcher: {' and '.join(places)} each say where the packs train: give one")
    return settings.get("pack_size")


@dataclass
class PreparedJob:
    """One job as Hydra's basic launcher and `run_job` make it: its sweep config (`hydra:`
    included), its run's facts, and its JobReturn (whose `cfg` is the task's config)."""

    sweep_cfg: DictConfig
    facts: RunFacts
    job_return: JobReturn


def prepared_job(context: HydraContext, cfg: DictConfig, overrides: Sequence[str], number: int) -> PreparedJob:
    """Job `number` of the sweep whose config is `cfg`, with `overrides` applied."""
    from ptlab.cli.train import run_facts

    sweep_cfg = context.config_loader.load_sweep_config(cfg, list(overrides))
    with open_dict(sweep_cfg):
        sweep_cfg.hydra.job.id = number
        sweep_cfg.hydra.job.num = number
    HydraConfig.instance().set_config(sweep_cfg)
    output_dir = Path(str(sweep_cfg.hydra.sweep.dir)) / str(sweep_cfg.hydra.sweep.subdir)
    with read_write(sweep_cfg.hydra.runtime), open_dict(sweep_cfg.hydra.runtime):
        sweep_cfg.hydra.runtime.output_dir = os.path.abspath(output_dir)
    HydraConfig.instance().set_config(sweep_cfg)
    task_cfg = copy.deepcopy(sweep_cfg)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    job_return = JobReturn(
        overrides=list(overrides),
        cfg=task_cfg,
        hydra_cfg=copy.deepcopy(HydraConfig.instance().cfg),
        working_dir=os.getcwd(),
        task_name=sweep_cfg.hydra.job.name,
    )
    return PreparedJob(sweep_cfg, run_facts(), job_return)


def is_ptlab_training(task_function: Optional[TaskFunction]) -> bool:
    """Whether the app's task is `ptlab-train`'s (ptlab/cli/train.py), whose jobs this launcher
    trains in packs instead of calling it."""
    return (getattr(task_function, "__module__", None), getattr(task_function, "__qualname__", None)) == (
        "ptlab.cli.train", "task")


def launch(
    settings: DictConfig, context: HydraContext, cfg: DictConfig, job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int, task_function: Optional[TaskFunction] = None,
) -> List[JobReturn]:  # fmt: skip
    """Compose, group, report and train the jobs; one JobReturn per job, in order, each job seen
    by the sweep's callbacks as it starts and ends (ptlab/sweep/hooks.py). Another Hydra app's jobs
    (its task is not ptlab's training) are launched as Hydra's basic launcher would."""
    if not is_ptlab_training(task_function):
        basic = BasicLauncher()
        basic.setup(hydra_context=context, task_function=task_function, config=cfg)
        return list(basic.launch(job_overrides, initial_job_idx))
    from ptlab.sweep.grouping import check_packable, group_jobs
    from ptlab.sweep.plan import packing_report, plan_packs
    from ptlab.training.pack_size import estimated_cap

    setup_globals()
    pack_size = check_launcher(settings)
    configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)
    Path(str(cfg.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    hooks = JobHooks(context.callbacks, task_function)
    jobs, usable = composed_jobs(context, cfg, job_overrides, initial_job_idx, hooks)
    configure_log(cfg.hydra.job_logging, cfg.hydra.verbose)
    check_packable([job.config for job in jobs])
    sweep_dir = Path(str(cfg.hydra.sweep.dir))
    halving = settings_of(settings.get("halving"))
    scheduler = None
    if halving is not None:
        scheduler = Scheduler(halving, jobs, [job_overrides[offset] for offset in usable],
                              [initial_job_idx + offset for offset in usable], sweep_dir)  # fmt: skip
    where = placement(settings, [job.config for job in jobs])
    kept = Kept.across_rounds(where) if scheduler is not None else Kept()

    def train(todo: List[int]) -> None:
        """The jobs `todo` (indices into `jobs`) grouped, planned, reported and placed."""
        groups = group_jobs([jobs[i].config for i in todo], mix_widths=bool(settings.get("mix_widths", False)))
        for group in groups:
            group.jobs = [todo[i] for i in group.jobs]
        caps = [pack_size or estimated_cap([jobs[i].config for i in g.jobs], where.memory(jobs[g.jobs[0]].config))
                for g in groups]  # fmt: skip
        plan = plan_packs(groups, caps, where.devices)
        log.info("hydra/launcher=packed: %d jobs in %d groups sharing a backbone setup, %d packs placed on %s%s",
                 len(todo), len(groups), len(plan), where, "" if pack_size is None else f", packs of at most {pack_size}")  # fmt: skip
        for line in packing_report(groups, plan, caps, where.devices, [offset + initial_job_idx for offset in usable]):
            log.info("  %s", line)
        if pack_size is None:
            log.info("  (planned from an estimate: a pack sizes itself to its device once its backbone is loaded)")
        packs = [PlacedPack(pack.group, [jobs[i] for i in pack.jobs], pack_size, [usable[i] for i in pack.jobs])
                 for pack in plan]  # fmt: skip
        place(packs, settings, where, sweep_dir, hooks, kept)

    try:
        if scheduler is None:
            train(list(range(len(jobs))))
        else:
            halved(scheduler, train, hooks, usable)
    finally:
        kept.close()
    return hooks.returns


def composed_jobs(
    context: HydraContext, cfg: DictConfig, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
    hooks: JobHooks,
) -> Tuple[List[Any], List[int]]:  # fmt: skip
    """Every job composed and told to `hooks`; those whose config validates (`Job`s) and their
    offsets in the sweep. A job whose own settings are bad fails alone, in one line."""
    from ptlab.training.opened_run import Job, record_failed

    jobs, usable = [], []
    for offset, overrides in enumerate(job_overrides):
        prepared = prepared_job(context, cfg, overrides, initial_job_idx + offset)
        hooks.add(prepared.sweep_cfg, prepared.job_return)
        log.info("\t#%d : %s", initial_job_idx + offset, " ".join(filter_overrides(overrides)))
        try:
            jobs.append(Job(prepared.job_return.cfg, to_object(prepared.job_return.cfg), prepared.facts))
            usable.append(offset)
        except ConfigError as error:  # this job's own settings: it fails alone
            hooks.started([offset])
            record_failed(prepared.facts.run_dir, error)
            hooks.ended(offset, None)
    return jobs, usable


def halved(scheduler: Scheduler, train: Callable[[List[int]], None], hooks: JobHooks, usable: List[int]) -> None:
    """Successive halving's rounds: each rung's jobs trained to it, then the decisions; a job that
    goes no further ends there (its JobReturn: its score at the rung)."""
    rungs = scheduler.halving.rungs
    for rung in range(1, rungs + 1):
        todo = scheduler.start_round(rung)
        hooks.holding = {usable[i] for i in todo} if rung < rungs else set()
        train(todo)
        hooks.holding = set()
        if rung == rungs:
            break
        stopped = scheduler.end_round(rung)
        hooks.ended_if_untold([usable[i] for i in stopped], list(stopped.values()))


@dataclass
class Placement:
    """Where the packs go: how many devices the plan fills, this machine's workers and GPUs (1
    worker: the packs train in this process, one group at a time), and whether the devices are a
    cluster's, whose memory this machine cannot read."""

    devices: int
    workers: int = 1
    gpus: int = 0
    remote: str = ""

    def memory(self, config: Any) -> Optional[float]:
        from ptlab.training.pack_size import device_bytes

        return None if self.remote else device_bytes(config, self.workers)

    def __str__(self) -> str:
        if self.remote:
            return self.remote.format(self.devices)
        return f"this machine, {self.workers} process{'es' if self.workers > 1 else ''} at once"


@dataclass
class Kept:
    """What a place keeps across successive halving's rounds (None: nothing): this process's
    backbones, by setup, or this machine's worker processes, each with its own."""

    loaded: Optional[Dict[str, Any]] = None
    workers: Optional[Workers] = None

    @classmethod
    def across_rounds(cls, where: Placement) -> Kept:
        """Successive halving's rounds: this process's backbones, or its workers' (submitit's and
        Ray's rounds are new jobs and tasks: nothing is kept)."""
        if where.remote:
            return cls()
        return cls(loaded={}) if where.workers == 1 else cls(workers=Workers(where.workers, where.gpus, keep=True))

    def close(self) -> None:
        if self.workers is not None:
            self.workers.close()


def placement(settings: DictConfig, configs: Sequence[Any]) -> Placement:
    import torch

    on_gpu = any(config.hardware.device == "cuda" for config in configs)
    if settings.get("ray"):
        from ptlab.sweep.ray_place import ray_devices

        return Placement(ray_devices(settings.ray, on_gpu), remote="the Ray cluster, {} packs at once")
    if settings.get("submitit"):
        return Placement(int(settings.submitit.get("array_parallelism") or 1), remote="submitit, {} jobs at once (array_parallelism)")
    gpus = torch.cuda.device_count() if on_gpu else 0
    workers = settings.get("workers") or max(1, gpus)
    return Placement(workers, workers, gpus)


def place(
    packs: List[PlacedPack], settings: DictConfig, where: Placement, sweep_dir: Path, hooks: JobHooks,
    kept: Optional[Kept] = None,
) -> None:  # fmt: skip
    """Train the packs where the settings say, each pack's jobs told to the callbacks as it starts
    and ends: here one group at a time on its backbone loaded once, else each pack on a device of
    its own (this machine's workers, submitit jobs or Ray tasks); `kept`: the backbones or workers
    kept across halving's rounds."""
    from ptlab.training.job import run_jobs
    from ptlab.training.preemption import Preempted

    for pack in packs:
        hooks.started(pack.numbers)

    def ended(pack: PlacedPack, values: Sequence[Optional[float]]) -> None:
        hooks.ended_if_untold(pack.numbers, values)
        log.info("pack of jobs %s ended: %d of %d runs finished", ",".join(map(str, pack.numbers)),
                 sum(value is not None for value in values), len(values))  # fmt: skip

    try:
        if settings.get("submitit"):
            on_submitit(packs, OmegaConf.to_container(settings.submitit, resolve=True), sweep_dir, ended)
        elif settings.get("ray"):
            from ptlab.sweep.ray_place import on_ray

            on_ray(packs, OmegaConf.to_container(settings.ray, resolve=True), ended)
        elif where.workers > 1:
            workers = kept.workers if kept and kept.workers else Workers(where.workers, where.gpus)
            workers.train(packs, ended)
        else:  # groups of one backbone setup (prompt widths) take the backbone the one before loaded
            loaded = kept.loaded if kept and kept.loaded is not None else {}
            for group in by_group(packs):
                values = run_jobs(group.jobs, group.size, hooks.ender(group.numbers), loaded=loaded)
                hooks.ended_if_untold(group.numbers, values)
    except Preempted as stop:  # each member's checkpoint is written; the same command resumes
        print(f"ptlab: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)


def by_group(packs: Sequence[PlacedPack]) -> List[PlacedPack]:
    """The packs of each group as one, for a process that trains a group on its backbone loaded once
    (`run_jobs` cuts it into the same balanced packs, `pack_size.balanced`)."""
    merged: Dict[int, PlacedPack] = {}
    for pack in packs:
        if pack.group in merged:
            merged[pack.group].jobs += pack.jobs
            merged[pack.group].numbers += pack.numbers
        else:
            merged[pack.group] = PlacedPack(pack.group, list(pack.jobs), pack.size, list(pack.numbers))
    return list(merged.values())

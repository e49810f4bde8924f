"""Which jobs of a sweep can train in one pack.

Jobs share a pass when they share the frozen backbone with the same settings: `backbone.*` (path,
dtype, dropout, ...), `hardware.*` (device, precision) and `trainer.compile`. Everything else may
differ. A job with a stage schedule (FPT) changes the shared backbone at its own steps, so it packs
only with jobs whose partial models coincide at every step (`stage_plan`,
ptlab/training/stages.py): the same stages, the same step count and, when a stage keeps fewer FFN
neurons, the same neuron scores' inputs. Runs of one prompt width pack together
(`MethodConfig.row_layout`; `hydra.launcher.mix_widths=true` mixes them): rows padded alike cost no
run another's padding and give every member its run alone's bits. The packs of each group are
planned, and reported, in ptlab/sweep/plan.py; how many runs fit in one pack is
ptlab/training/pack_size.py's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Sequence

from ptlab.config.difference import config_difference
from ptlab.config.schema import Config
from ptlab.errors import ConfigError
from ptlab.model.families import FAMILIES
from ptlab.training.build import shared_settings
from ptlab.training.stages import stage_plan


@dataclasses.dataclass
class Group:
    """Jobs that can share one backbone (and so packs); `why` says why it is not the first group."""

    jobs: List[int]
    settings: Dict[str, Any]
    why: str = ""


def check_packable(configs: Sequence[Config]) -> None:
    """Settings no pack can run: one line before any model loads."""
    for config in configs:
        FAMILIES[config.backbone.family]  # an unknown family: the registry's one line
        if config.hardware.distributed:
            raise ConfigError(
                f"hydra/launcher=packed trains each pack in one process; hardware={config.hardware.name} "
                "(hardware.distributed=true) needs torchrun: use hardware=gpu or the basic launcher"
            )


def group_jobs(configs: Sequence[Config], mix_widths: bool = False) -> List[Group]:
    """The sweep's jobs (by index) in groups that can share a pack, in sweep order."""
    groups: List[Group] = []
    for index, config in enumerate(configs):
        settings = {**shared_settings(config), "stage plan": stage_plan(config)}
        if not mix_widths:
            settings["prompt width"] = config.method.row_layout()
        group = next((g for g in groups if g.settings == settings), None)
        if group is not None:
            group.jobs.append(index)
            continue
        if settings["stage plan"] is not None:
            why = staged_why(config, settings, groups)
        else:
            plain = next((g for g in groups if g.settings["stage plan"] is None), None)
            difference = None if plain is None else config_difference(plain.settings, settings, ignore=())
            why = "" if difference is None else layout_why(plain.settings, settings, difference)
        groups.append(Group([index], settings, why))
    return groups


def staged_why(config: Config, settings: Dict[str, Any], groups: Sequence[Group]) -> str:
    """Why a staged job (FPT) starts a new group: the first one says what staged jobs share; a later
    one names what differs from the first group on the same schedule."""
    plan = settings["stage plan"]
    staged = [g for g in groups if g.settings["stage plan"] is not None]
    same = next((g for g in staged if g.settings["stage plan"]["stages"] == plan["stages"]), None)
    if same is not None:
        return f"other partial models: {config_difference(same.settings, settings, ignore=())}"
    if staged:
        return f"other partial models: stages={config.stages.name}"
    return (
        f"stages={config.stages.name}: its partial models change the backbone at its own steps; "
        "it packs only with jobs whose partial models coincide (same stages, steps and neuron scores' "
        "seed, method, task and data)"
    )



def layout_why(first: Dict[str, Any], settings: Dict[str, Any], difference: str) -> str:
    """Why a job starts a group: another backbone setup, or only another prompt width."""
    if {k: v for k, v in first.items() if k != "prompt width"} != {k: v for k, v in settings.items() if k != "prompt width"}:
        return f"another backbone setup: {difference}"
    kind, width, *stacks = settings["prompt width"]
    where = f" ({', '.join(stacks[0])})" if stacks and stacks[0] else ""
    return (f"another prompt width ({kind} of {width}{where}): a pack holds one width, on the backbone "
            "already loaded (hydra.launcher.mix_widths=true mixes them)")

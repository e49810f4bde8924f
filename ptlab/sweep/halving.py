"""Successive halving as the packed launcher's scheduler (`hydra.launcher.halving`).

Hydra's sweeper proposes the jobs; this scheduler stops and promotes them, as Ray Tune splits a
search algorithm from its scheduler (ASHA: Li et al., MLSys 2020; successive halving: Jamieson and
Talwalkar, AISTATS 2016). It is synchronous: every job trains to rung 1, the top 1/eta of each
bracket's configurations go on to rung 2, and so on to the full run.

- A *configuration* is a job's overrides less the `average` keys: its seeds are scored together,
  by their mean. A *bracket* is the configurations that share the `within` keys' values (every
  method keeps its own best lr).
- Rung i of n is at floor(max_steps / eta^(n - i)) steps. A job trains to its rung with its full
  run's lr schedule, evaluates there (a look that leaves its best prompt and patience as the full
  run's) and stops: `summary.json` says `status: stopped`, its rung and steps. Promoted, it resumes
  from that checkpoint, so a run that reaches the end equals its run without the scheduler.
- Decisions come from the members' own records (the validation events of `metrics.jsonl`, which
  carry `loss` for ties), so a rerun after a kill reaches the same ones and trains nothing twice
  past a checkpoint; they are written to the sweep folder's `halving.json` and logged as a table.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ptlab.errors import ConfigError
from ptlab.files import write_text_atomically
from ptlab.training.run_folder import FAILURE_FILE, is_finished, read_events, read_summary
from ptlab.training.tracking import key

if TYPE_CHECKING:  # the driver's --help imports no torch
    from ptlab.training.opened_run import Job

log = logging.getLogger("ptlab")

HALVING_FILE = "halving.json"


@dataclass
class Halving:
    """`hydra.launcher.halving`: the metric that ranks (null: the task's main metric), eta (keep the
    top 1/eta at each rung), the number of rungs, and the override keys that split brackets
    (`within`) and that a configuration averages over (`average`)."""

    metric: Optional[str] = None
    eta: int = 3
    rungs: int = 3
    within: List[str] = field(default_factory=list)
    average: List[str] = field(default_factory=list)


def rung_steps(max_steps: int, eta: int, rungs: int) -> List[int]:
    """The step of each rung: floor(max_steps / eta^(rungs - i)) for i = 1 .. rungs."""
    return [max_steps // eta ** (rungs - i) for i in range(1, rungs + 1)]


@dataclass
class Configuration:
    """A configuration of a bracket: its overrides (less the averaged keys) and its jobs (indices
    into the sweep's usable jobs)."""

    overrides: Tuple[str, ...]
    jobs: List[int]


@dataclass
class Bracket:
    within: Tuple[str, ...]  # the `within` keys' `key=value`s
    steps: List[int]  # its rungs' steps
    configurations: List[Configuration]


def settings_of(given: Optional[Mapping[str, Any]]) -> Optional[Halving]:
    """The scheduler's settings, or None when it is off; a bad one is one line."""
    if not given:
        return None
    unknown = sorted(set(given) - set(Halving.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"hydra.launcher.halving.{unknown[0]} is not a setting of successive halving "
                          f"(it takes {', '.join(Halving.__dataclass_fields__)})")  # fmt: skip
    halving = Halving(**{k: (list(v) if k in ("within", "average") else v) for k, v in given.items()})
    for name, least in (("eta", 2), ("rungs", 1)):
        value = getattr(halving, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"hydra.launcher.halving.{name}={value!r}: give a whole number, {least} or more")
    return halving


def brackets(halving: Halving, jobs: Sequence[Job], overrides: Sequence[Sequence[str]]) -> List[Bracket]:
    """The jobs' brackets and configurations, in job order, checked before anything trains: the
    metric each task reports, the keys some override sets, one max_steps per bracket, and no rung
    inside an FPT partial-model stage."""
    from ptlab.training.stages import partial_at

    given = {key(item) for items in overrides for item in items}
    for name in ("within", "average"):
        missing = [k for k in getattr(halving, name) if k not in given]
        if missing:
            raise ConfigError(f"hydra.launcher.halving.{name}: no override sets {missing[0]!r} "
                              f"(the sweep's overrides set {', '.join(sorted(given))})")  # fmt: skip
    grouped: Dict[Tuple[str, ...], Dict[Tuple[str, ...], List[int]]] = defaultdict(dict)
    for index, (job, items) in enumerate(zip(jobs, overrides)):
        check_job(halving, job)
        within = tuple(item for item in items if key(item) in halving.within)
        configuration = tuple(item for item in items if key(item) not in halving.average)
        grouped[within].setdefault(configuration, []).append(index)
    result = []
    for within, configurations in grouped.items():
        members = [jobs[i] for indices in configurations.values() for i in indices]
        lengths = sorted({job.config.trainer.max_steps for job in members})
        if len(lengths) > 1:
            raise ConfigError(f"hydra.launcher.halving: the bracket {' '.join(within) or '(all jobs)'} mixes "
                              f"trainer.max_steps {lengths}: its rungs need one (split it with `within`)")  # fmt: skip
        steps = rung_steps(lengths[0], halving.eta, halving.rungs)
        if steps[0] < 1:
            raise ConfigError(f"hydra.launcher.halving: rung 1 of {halving.rungs} would be at step 0 of "
                              f"{lengths[0]}: give fewer rungs, a smaller eta or more steps")  # fmt: skip
        for job in members:
            inside = [step for step in steps[:-1] if partial_at(job.config.stages, lengths[0], step)]
            if inside:
                raise ConfigError(f"hydra.launcher.halving: rung step {inside[0]} falls inside a partial-model "
                                  f"stage of stages={job.config.stages.name}: rungs evaluate the full model")  # fmt: skip
        result.append(Bracket(within, steps, [Configuration(c, i) for c, i in configurations.items()]))
    return result


def check_job(halving: Halving, job: Job) -> None:
    task = job.config.task
    if halving.metric is not None and halving.metric not in task.metrics:
        raise ConfigError(f"hydra.launcher.halving.metric={halving.metric!r}: task {task.name} reports "
                          f"{', '.join(task.metrics)}")  # fmt: skip
    if job.config.trainer.max_steps is None:
        raise ConfigError("hydra.launcher.halving counts its rungs in steps: set trainer.max_steps")


def rung_score(run_dir: Path, step: int, metric: str) -> Optional[Tuple[float, float]]:
    """The run's `metric` and validation loss at its last evaluation up to `step` (a run that
    stopped early on its own is ranked by its last one), None when it has none."""
    found = None
    for event in read_events(run_dir):
        if event.get("split") == "validation" and event["step"] <= step and metric in event:
            found = (float(event[metric]), float(event.get("loss", math.inf)))
    return found


@dataclass
class Ranked:
    """A configuration at a rung: its mean score and loss over the seeds that have one."""

    configuration: Configuration
    score: Optional[float]
    loss: Optional[float]
    promoted: bool = False


def decide(bracket: Bracket, eta: int, scores: Mapping[int, Optional[Tuple[float, float]]]) -> List[Ranked]:
    """The bracket's configurations at a rung, best first: by mean score, then lower mean loss,
    then job order; the top 1/eta (rounded down, at least one) of those with a score promoted."""
    ranked = []
    for configuration in bracket.configurations:
        found = [scores[i] for i in configuration.jobs if scores.get(i) is not None]
        if found:
            ranked.append(Ranked(configuration, sum(f[0] for f in found) / len(found), sum(f[1] for f in found) / len(found)))
        else:
            ranked.append(Ranked(configuration, None, None))
    ranked.sort(key=lambda r: (r.score is None, -(r.score or 0.0), r.loss or 0.0, r.configuration.jobs[0]))
    for r in [r for r in ranked if r.score is not None][: max(1, len(bracket.configurations) // eta)]:
        r.promoted = True
    return ranked


class Scheduler:
    """The sweep's successive halving: which jobs train in each round and to which rung, the
    decisions after each, `halving.json` and the table."""

    def __init__(self, halving: Halving, jobs: Sequence[Job], overrides: Sequence[Sequence[str]],
                 numbers: Sequence[int], sweep_dir: Path) -> None:  # fmt: skip
        self.halving, self.jobs, self.numbers, self.sweep_dir = halving, jobs, numbers, sweep_dir
        self.brackets = brackets(halving, jobs, overrides)
        self.alive = [i for b in self.brackets for c in b.configurations for i in c.jobs]
        values: Dict[str, set] = defaultdict(set)
        for items in overrides:
            for item in items:
                values[key(item)].add(item)
        self.varying = {k for k, v in values.items() if len(v) > 1} - set(halving.within)  # what the table shows
        self.record: List[Dict[str, Any]] = []

    def metric(self, index: int) -> str:
        return self.halving.metric or self.jobs[index].config.task.main_metric

    def start_round(self, rung: int) -> List[int]:
        """The jobs of round `rung`, each told where it stops (its end at the last rung)."""
        from ptlab.training.opened_run import Rung

        last = rung == self.halving.rungs
        for bracket in self.brackets:
            for configuration in bracket.configurations:
                for i in configuration.jobs:
                    self.jobs[i].rung = None if last else Rung(rung, self.halving.rungs, bracket.steps[rung - 1])
        return sorted(self.alive)

    def end_round(self, rung: int) -> Dict[int, Optional[float]]:
        """The decisions at `rung` from the members' records; the jobs stopped here with the value
        their JobReturn carries (the metric at the rung; a run that finished on its own, its best)."""
        stopped: Dict[int, Optional[float]] = {}
        promoted: List[int] = []
        entry = {"rung": rung, "brackets": []}
        for bracket in self.brackets:
            step = bracket.steps[rung - 1]
            live = [i for c in bracket.configurations for i in c.jobs if i in self.alive]
            if not live:
                continue
            scores = {i: self.score(i, step) for i in live}
            alive_bracket = Bracket(bracket.within, bracket.steps,
                                    [Configuration(c.overrides, [i for i in c.jobs if i in live])
                                     for c in bracket.configurations if any(i in live for i in c.jobs)])  # fmt: skip
            ranked = decide(alive_bracket, self.halving.eta, scores)
            for r in ranked:
                for i in r.configuration.jobs:
                    if r.promoted and scores[i] is not None:
                        promoted.append(i)
                    else:
                        stopped[i] = self.returned(i, scores[i])
            entry["brackets"].append(self.table(bracket, rung, step, ranked))
        self.alive = promoted
        self.record.append(entry)
        write_text_atomically(self.sweep_dir / HALVING_FILE, json.dumps(self.report(), indent=2))
        return stopped

    def score(self, index: int, step: int) -> Optional[Tuple[float, float]]:
        """A job's score and loss at the rung at `step`; None when it failed in this round."""
        run_dir = self.jobs[index].facts.run_dir
        if (run_dir / FAILURE_FILE).exists():
            return None
        return rung_score(run_dir, step, self.metric(index))

    def returned(self, index: int, score: Optional[Tuple[float, float]]) -> Optional[float]:
        """What a job that goes no further returns to Hydra: a run that finished on its own
        (`trainer.patience`) its best validation value, a stopped one its score at the rung."""
        summary = read_summary(self.jobs[index].facts.run_dir)
        if is_finished(summary):
            return summary["best"][self.jobs[index].config.task.main_metric]
        return None if score is None else score[0]

    def table(self, bracket: Bracket, rung: int, step: int, ranked: List[Ranked]) -> Dict[str, Any]:
        rows = [{"overrides": list(r.configuration.overrides), "jobs": [self.numbers[i] for i in r.configuration.jobs],
                 "score": r.score, "loss": r.loss, "promoted": r.promoted} for r in ranked]  # fmt: skip
        metric = self.metric(ranked[0].configuration.jobs[0])
        log.info("halving: rung %d of %d (step %d), bracket %s: %d of %d configurations promoted (by %s)",
                 rung, self.halving.rungs, step, " ".join(bracket.within) or "(all jobs)",
                 sum(r.promoted for r in ranked), len(ranked), metric)  # fmt: skip
        for place, row in enumerate(rows, 1):
            shown = "failed" if row["score"] is None else f"{metric} {row['score']:.4f} (loss {row['loss']:.4f})"
            shown_overrides = " ".join(item for item in row["overrides"] if key(item) in self.varying)
            log.info("  %2d. %-40s %-28s jobs %-10s %s", place, shown_overrides or "(the only one)",
                     shown, ",".join(map(str, row["jobs"])), "promoted" if row["promoted"] else "stopped")  # fmt: skip
        return {"within": list(bracket.within), "step": step, "configurations": rows}

    def report(self) -> Dict[str, Any]:
        return {
            "settings": {"metric": self.halving.metric, "eta": self.halving.eta, "rungs": self.halving.rungs,
                         "within": self.halving.within, "average": self.halving.average},
            "rung_steps": {" ".join(b.within) or "(all jobs)": b.steps for b in self.brackets},
            "decisions": self.record,
        }  # fmt: skip

"""A comparison of runs: grouped by the settings that vary, tasks as columns, seeds as the sample;
each cell's scores and a difference to a baseline with its test. `ptlab-compare` writes it as tables
(ptlab/lab/comparison_tables.py) and figures (ptlab/lab/plots.py)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ptlab.lab.run_record import RunRecord
from ptlab.method_stats import is_method_statistic


@dataclass
class Cell:
    """One group's runs on one task."""

    runs: List[RunRecord]
    values: List[float]  # the finished runs' scores, in run order
    seeds: List[Optional[int]]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.mean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    @property
    def ci95(self) -> float:
        """Half width of the 95 % confidence interval of the mean (Student's t); nan below 2 runs."""
        if self.n < 2:
            return math.nan
        from scipy import stats

        return float(stats.t.ppf(0.975, self.n - 1)) * self.std / math.sqrt(self.n)

    def cost(self, key: str) -> float:
        values = [r.summary[key] for r in self.finished if r.summary.get(key) is not None]
        return statistics.mean(values) if values else math.nan

    @property
    def finished(self) -> List[RunRecord]:
        return [r for r in self.runs if r.status == "finished"]

    @property
    def ms_per_step(self) -> float:
        steps = [
            1000 * r.summary["train_seconds"] / r.summary["steps"]
            for r in self.finished
            if r.summary["steps"]
        ]
        return statistics.mean(steps) if steps else math.nan


@dataclass
class Difference:
    delta: float
    p: float
    test: str  # paired | Welch


def difference(cell: Cell, base: Cell) -> Optional[Difference]:
    """cell - base, with a paired t-test when both ran the same seeds (each seed shares its data order
    and initial draws), else Welch's unequal-variance t-test; None when either has under 2 runs."""
    from scipy import stats

    if cell.n < 2 or base.n < 2:
        return None
    delta = cell.mean - base.mean
    if sorted(cell.seeds, key=str) == sorted(base.seeds, key=str) and None not in cell.seeds:
        mine = dict(zip(cell.seeds, cell.values))
        theirs = dict(zip(base.seeds, base.values))
        pairs = [(mine[s], theirs[s]) for s in mine]
        if (
            len({round(a - b, 12) for a, b in pairs}) == 1
        ):  # the same difference in every seed: nothing to test
            return Difference(delta, 1.0 if pairs[0][0] == pairs[0][1] else math.nan, "paired")
        p = stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs]).pvalue
        return Difference(delta, float(p), "paired")
    p = stats.ttest_ind(cell.values, base.values, equal_var=False).pvalue
    return Difference(delta, float(p), "Welch")


@dataclass
class Comparison:
    runs: List[RunRecord]
    by: List[str]
    metric: Optional[str]
    stat: str
    groups: List[Tuple[str, ...]] = field(default_factory=list)
    tasks: List[str] = field(default_factory=list)
    members: Dict[Tuple[Tuple[str, ...], str], List[RunRecord]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for run in self.runs:
            group, task = self.group_of(run), run.task
            if group not in self.groups:
                self.groups.append(group)
            if task not in self.tasks:
                self.tasks.append(task)
            self.members.setdefault((group, task), []).append(run)

    def cell(
        self, group: Tuple[str, ...], task: str, metric: Optional[str] = None, stat: Optional[str] = None
    ) -> Cell:
        """The group's runs on `task` and their scores (default: the comparison's metric and stat)."""
        cell = Cell(self.members.get((group, task), []), [], [])
        for run in cell.runs:
            value = run.score(metric or self.metric, stat or self.stat)
            if value is not None:
                cell.values.append(value)
                cell.seeds.append(run.seed)
        return cell

    def group_of(self, run: RunRecord) -> Tuple[str, ...]:
        return tuple(str(run.lookup(key)) for key in self.by)

    def label(self, group: Tuple[str, ...]) -> str:
        return (
            ", ".join(group) if len(self.by) == 1 else ", ".join(f"{k}={v}" for k, v in zip(self.by, group))
        )

    def finished(self, task: str) -> List[RunRecord]:
        return [r for g in self.groups for r in self.members.get((g, task), []) if r.status == "finished"]

    def metric_name(self, task: str) -> str:
        finished = self.finished(task)
        return self.metric or (finished[0].summary["main_metric"] if finished else "?")

    def metrics_of(self, task: str) -> List[str]:
        """Every metric the task's finished runs report (a method's own statistics aside)."""
        names: List[str] = []
        for run in self.finished(task):
            for key, value in (run.summary.get("best") or {}).items():
                if key != "step" and not is_method_statistic(key) and isinstance(value, (int, float)):
                    names += [key] if key not in names else []
        return names

    def floor(self, task: str) -> Optional[float]:
        """The constant predictor's score in the compared metric and split (majority class, mean
        predictor): a test score's floor is the test split's (`test_baseline`), which a held-out
        validation split's need not equal; runs from before `baseline` was recorded give their
        majority-class accuracy, runs from before `test_baseline` no test floor."""
        metric = self.metric_name(task)
        for run in self.finished(task):
            if run.scored_stat(self.stat) == "test":
                value = (run.summary.get("test_baseline") or {}).get(metric)
            else:
                baseline = run.summary.get("baseline") or {}
                value = baseline.get(metric, run.summary.get("majority_class") if metric == "acc" else None)
            if value is not None:
                return value
        return None

    def find_group(self, baseline: str) -> Tuple[str, ...]:
        """The group named by `--baseline`: `key=value[,key=value]` or the label the table prints."""
        wanted = dict(part.split("=", 1) for part in baseline.split(",") if "=" in part)
        for group in self.groups:
            settings = dict(zip(self.by, group))
            if (wanted and all(settings.get(k) == v for k, v in wanted.items())) or self.label(
                group
            ) == baseline:
                return group
        labels = ", ".join(self.label(g) for g in self.groups)
        raise SystemExit(f"ptlab-compare: --baseline {baseline!r} matches no group (groups: {labels})")

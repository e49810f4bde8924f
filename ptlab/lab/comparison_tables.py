"""The comparison's tables (`ptlab-compare`, `ptlab/cli/compare.py`): scores per group and task,
differences to a baseline, each group's best setting, costs, stopped runs and problems, as table.md
and table.csv."""

from __future__ import annotations

import csv
import math
import re
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ptlab.lab.comparison import Cell, Comparison, difference
from ptlab.lab.run_record import RunRecord

# never grouping keys: the sample (seed), the columns (task), and settings that do not change a result
NOT_GROUPING = ("seed", "task", "trainer.resume", "logger", "experiment")


def shown_path(path: Path) -> str:
    """Relative to the working folder when inside it (tables stay valid on another machine)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def natural_key(path: Path) -> List[object]:
    """Multirun job folders 0, 1, ..., 10 in launch order, not 0, 1, 10, 2."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def varying_keys(runs: Sequence[RunRecord]) -> List[str]:
    """Override keys whose values differ between runs, in the order the command lines give them."""
    keys: List[str] = []
    for run in runs:
        for key in run.overrides:
            if key not in keys and not key.startswith("hydra.") and key not in NOT_GROUPING:
                keys.append(key)
    return [k for k in keys if len({str(r.lookup(k)) for r in runs}) > 1]


def percent(value: float, metric_scale: float) -> str:
    return "–" if math.isnan(value) else f"{metric_scale * value:.1f}"


def score_cell(cell: Cell, scale: float) -> str:
    if cell.n == 0:
        return "–"
    text = f"{scale * cell.mean:.1f}"  # one run has no spread to show
    if cell.n > 1:
        text += f" ± {scale * cell.std:.1f} [{scale * (cell.mean - cell.ci95):.1f}, {scale * (cell.mean + cell.ci95):.1f}]"
    missing = len(cell.runs) - cell.n
    return text + f" (n={cell.n}" + (f", {missing} not finished)" if missing else ")")


def steps_to(run: RunRecord, metric: str, target: float) -> Optional[int]:
    """The first validation step at which the run reached `target`; None if it never did."""
    return next((e["step"] for e in run.curve("validation", metric) if e[metric] >= target), None)


def table_head(comp: Comparison) -> List[str]:
    return [f"| {' / '.join(comp.by)} | " + " | ".join(comp.tasks) + " |", "|---|" + "---|" * len(comp.tasks)]


def score_section(comp: Comparison, scale: float) -> List[str]:
    """What the score is, the floor, and one row of mean ± std [CI] per group."""
    stat = {"auto": "test split when the runs have one, else best validation", "best": "best validation",
            "final": "last validation", "test": "test split"}[comp.stat]  # fmt: skip
    floors = ", ".join(
        f"{task} {percent(comp.floor(task), scale)}" for task in comp.tasks if comp.floor(task) is not None
    )
    lines = [
        f"{len(comp.runs)} runs. Score: {stat} of each task's main metric (in %: "
        + ", ".join(f"{t}: {comp.metric_name(t)}" for t in comp.tasks)
        + "), mean ± std over seeds [95 % confidence interval of the mean] (n = finished runs). "
        + f"Floor (one constant prediction: the majority class, the mean for regression): {floors or 'not recorded'}.",
        "",
        *table_head(comp),
    ]
    for group in comp.groups:
        cells = [score_cell(comp.cell(group, t), scale) for t in comp.tasks]
        lines.append(f"| {comp.label(group)} | " + " | ".join(cells) + " |")
    return lines


def difference_section(comp: Comparison, baseline: Tuple[str, ...], scale: float) -> List[str]:
    """Each group's difference to the baseline group, with its test."""
    lines = ["", f"Difference to **{comp.label(baseline)}** in points (p: paired t-test over shared seeds, "
             "else Welch's t-test):", "", *table_head(comp)]  # fmt: skip
    for group in comp.groups:
        if group == baseline:
            continue
        parts = []
        for task in comp.tasks:
            diff = difference(comp.cell(group, task), comp.cell(baseline, task))
            if diff is None:
                parts.append("–")
            elif math.isnan(diff.p):
                parts.append(f"{scale * diff.delta:+.1f} (the same in every seed: no test)")
            else:
                parts.append(f"{scale * diff.delta:+.1f} (p={diff.p:.2f}, {diff.test})")
        lines.append(f"| {comp.label(group)} | " + " | ".join(parts) + " |")
    return lines


def best_settings(
    comp: Comparison, keys: Sequence[str], task: str
) -> Dict[Tuple[str, ...], List[Tuple[float, Tuple[str, ...]]]]:
    """Per group of the other `--by` keys, its settings of `keys` on `task`, best mean score first."""
    inner = [comp.by.index(key) for key in keys]
    ranked: Dict[Tuple[str, ...], List[Tuple[float, Tuple[str, ...]]]] = {}
    for group in comp.groups:
        cell = comp.cell(group, task)
        if cell.n:
            outer = tuple(v for i, v in enumerate(group) if i not in inner)
            ranked.setdefault(outer, []).append((cell.mean, group))
    return {outer: sorted(found, key=lambda item: -item[0]) for outer, found in ranked.items()}


def setting_of(comp: Comparison, keys: Sequence[str], group: Tuple[str, ...]) -> str:
    return ",".join(f"{key}={group[comp.by.index(key)]}" for key in keys)


def best_section(comp: Comparison, keys: Sequence[str], scale: float) -> List[str]:
    """`--best-of KEY...`: each group's best setting of KEY (a learning rate chosen per method on
    validation), with the others it beat."""
    missing = [key for key in keys if key not in comp.by]
    if missing:
        raise SystemExit(
            f"ptlab-compare: --best-of {' '.join(missing)}: not among the grouping keys {comp.by}"
        )
    others = [key for key in comp.by if key not in keys]
    lines = ["", f"Best {', '.join(keys)} per {', '.join(others) or 'comparison'} (highest mean score; "
             "the others in order):", "", f"| {' / '.join(others) or '-'} | task | best | mean | others |",
             "|---|---|---|---|---|"]  # fmt: skip
    for task in comp.tasks:
        for outer, ranked in best_settings(comp, keys, task).items():
            (mean, best), rest = ranked[0], ranked[1:]
            shown = "; ".join(f"{setting_of(comp, keys, g)} {scale * m:.1f}" for m, g in rest) or "–"
            lines.append(
                f"| {', '.join(outer) or '-'} | {task} | {setting_of(comp, keys, best)} | {scale * mean:.1f} | {shown} |"
            )
    return lines


def cost_section(comp: Comparison, target: Optional[float], scale: float) -> List[str]:
    """One row of costs per group and task (and steps to `target`); packed runs say how many runs
    shared the time and memory they report."""
    lines = ["", "Cost per run (means over finished runs; peak memory: the training's RSS high-water mark on CPU, "
             "allocated memory on CUDA):", ""]  # fmt: skip
    packed = any(r.summary.get("pack_size", 1) > 1 for r in comp.runs if r.status == "finished")
    if packed:
        lines.insert(-1, "A packed run's train s, ms/step, examples/s and peak memory are its pack's, shared with "
                         "the other runs in it (runs per pack); its parameters and FLOPs are its own.")  # fmt: skip
    header = f"| {' / '.join(comp.by)} | task | trainable params | train s | ms/step | examples/s | peak MiB | train TFLOPs | FLOPs vs full |"
    if packed:
        header += " runs per pack |"
    if target is not None:
        header += f" steps to {scale * target:g} |"
    lines += [header, "|---|" * 1 + "---|" * (header.count("|") - 2)]
    for group in comp.groups:
        for task in comp.tasks:
            cell = comp.cell(group, task)
            if not cell.finished:
                continue
            row = (
                f"| {comp.label(group)} | {task} | {cell.cost('trainable_params'):,.0f} | {cell.cost('train_seconds'):.1f} "
                f"| {cell.ms_per_step:.0f} | {cell.cost('examples_per_s'):.1f} | {cell.cost('peak_memory_mb'):.0f} "
                f"| {cell.cost('train_flops') / 1e12:.2f} | {cell.cost('flops_ratio'):.2f} |"
            )
            if packed:
                row += f" {statistics.mean(r.summary.get('pack_size', 1) for r in cell.finished):.1f} |"
            if target is not None:
                reached = [steps_to(r, comp.metric_name(task), target) for r in cell.finished]
                hits = [s for s in reached if s is not None]
                mean = f"{statistics.mean(hits):.0f}" if hits else "never"
                row += f" {mean} ({len(hits)}/{len(reached)} runs) |"
            lines.append(row)
    return lines


def stopped_section(comp: Comparison, scale: float) -> List[str]:
    """The runs successive halving stopped at a rung (hydra.launcher.halving): apart from the
    finished ones, which alone make the tables above and choose `--best-of`."""
    stopped = [r for r in comp.runs if r.status == "stopped"]
    if not stopped:
        return []
    lines = ["", f"Stopped by successive halving ({len(stopped)} runs; not in the tables above):", ""]
    for run in sorted(stopped, key=lambda r: (-r.summary["rung"], natural_key(r.path))):
        summary = run.summary
        metric = summary["main_metric"]
        lines.append(f"- `{shown_path(run.path)}`: rung {summary['rung']} of {summary['rungs']} (step {summary['steps']}), "
                     f"validation {metric} {scale * summary['final'][metric]:.1f}")  # fmt: skip
    return lines


def problem_section(comp: Comparison) -> List[str]:
    """The runs without a result, each with its error."""
    problems = [r for r in comp.runs if r.status not in ("finished", "stopped")]
    if not problems:
        return []
    lines = ["", "Runs without a result:", ""]
    for run in problems:
        error = (run.summary or {}).get(
            "error", "no summary.json: still running, cut short, or never started"
        )
        lines.append(f"- `{shown_path(run.path)}` ({run.status}): {error}")
    return lines


def markdown(comp: Comparison, baseline: Optional[Tuple[str, ...]], target: Optional[float], command: str,
             figures: List[str], note: str = "", best_of: Sequence[str] = ()) -> str:  # fmt: skip
    scale = 100.0
    lines = [f"Command: `{command}`", "", *([note, ""] if note else []), *score_section(comp, scale)]
    if best_of:
        lines += best_section(comp, best_of, scale)
    if baseline is not None:
        lines += difference_section(comp, baseline, scale)
    lines += cost_section(comp, target, scale) + stopped_section(comp, scale) + problem_section(comp)
    lines += [""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def write_csv(comp: Comparison, baseline: Optional[Tuple[str, ...]], path: Path) -> None:
    """One row per group, task, metric and statistic (best / final validation, test when run)."""
    costs = (
        "trainable_params",
        "train_seconds",
        "examples_per_s",
        "peak_memory_mb",
        "train_flops",
        "flops_ratio",
    )
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*comp.by, "task", "metric", "stat", "n", "runs", "mean", "std", "ci95", "delta", "p",
                         "test", "ms_per_step", *costs])  # fmt: skip
        for task in comp.tasks:
            for metric in comp.metrics_of(task):
                for stat in ("best", "final", "test"):
                    for group in comp.groups:
                        cell = comp.cell(group, task, metric, stat)
                        if not cell.runs or (stat == "test" and not cell.n):
                            continue
                        diff = None
                        if baseline is not None and group != baseline:
                            diff = difference(cell, comp.cell(baseline, task, metric, stat))
                        writer.writerow([*group, task, metric, stat, cell.n, len(cell.runs), cell.mean, cell.std,
                                         cell.ci95, *(("", "", "") if diff is None else (diff.delta, diff.p, diff.test)),
                                         cell.ms_per_step, *(cell.cost(c) for c in costs)])  # fmt: skip

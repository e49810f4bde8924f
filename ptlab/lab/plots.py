"""The figures of `ptlab-compare` (matplotlib, written as PNG files beside table.md).

Per task: learning curves (validation score against steps, training seconds and training FLOPs;
training loss against steps), the score against each cost (Pareto plots: training seconds, peak
memory, trainable parameters), and, when the runs route (SMoP), how often each prompt was chosen.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Tuple

from ptlab.method_stats import routing_shares

if TYPE_CHECKING:
    from ptlab.lab.comparison import Comparison

CURVE_AXES = (("step", "step"), ("train_s", "training seconds"), ("flops", "training FLOPs"))
PARETO_AXES = (("train_seconds", "training seconds"), ("peak_memory_mb", "peak memory (MiB)"),
               ("trainable_params", "trainable parameters"))  # fmt: skip


def mean_curve(
    runs, split: str, key: str, x: str
) -> Tuple[List[float], List[float], List[float], List[float]]:
    """x, mean y, min y, max y over the runs at each logged step (x: the mean of the runs' x there)."""
    by_step: Dict[int, List[Tuple[float, float]]] = {}
    for run in runs:
        for event in run.curve(split, key):
            if x in event:  # every event has its step; train_s and flops only evaluations logged since
                by_step.setdefault(event["step"], []).append((event[x], event[key]))
    steps = sorted(by_step)
    xs = [statistics.mean(p[0] for p in by_step[s]) for s in steps]
    ys = [[p[1] for p in by_step[s]] for s in steps]
    return xs, [statistics.mean(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


def finish(fig, score_axes, majority, title: str, path: Path) -> None:
    """The majority-class line on every score axis, a log x for the last one (FLOPs, parameters),
    the legend, the title; then the file."""
    import matplotlib.pyplot as plt

    for ax in score_axes:
        if majority is not None:
            ax.axhline(100 * majority, color="grey", linestyle="--", linewidth=1, label="majority class")
    score_axes[-1].set_xscale("log")
    score_axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def curves_figure(comp: Comparison, task: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    metric = comp.metric_name(task)
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for group in comp.groups:
        cell = comp.cell(group, task)
        label = comp.label(group)
        for ax, (x, name) in zip(axes, CURVE_AXES):
            xs, ys, low, high = mean_curve(cell.runs, "validation", metric, x)
            if xs:
                (line,) = ax.plot(xs, [100 * y for y in ys], marker="o", label=label)
                ax.fill_between(xs, [100 * y for y in low], [100 * y for y in high], alpha=0.15,
                                color=line.get_color())  # fmt: skip
            ax.set_xlabel(name)
            ax.set_ylabel(f"validation {metric} (%)")
        xs, ys, _, _ = mean_curve(cell.runs, "train", "loss", "step")
        axes[3].plot(xs, ys, label=label)
        axes[3].set_xlabel("step")
        axes[3].set_ylabel("training loss")
        axes[3].set_yscale("log")
    finish(fig, axes[:3], comp.floor(task), f"{task}: mean over seeds (band: min to max)", path)


def pareto_figure(comp: Comparison, task: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PARETO_AXES), figsize=(15, 4.2))
    for ax, (key, name) in zip(axes, PARETO_AXES):
        for group in comp.groups:
            cell = comp.cell(group, task)
            if cell.n == 0 or math.isnan(cell.cost(key)):
                continue
            ax.errorbar(cell.cost(key), 100 * cell.mean, yerr=100 * cell.std, fmt="o", capsize=3,
                        label=comp.label(group))  # fmt: skip
        ax.set_xlabel(name + " per run")
        ax.set_ylabel(f"{comp.metric_name(task)} (%)")
    title = f"{task}: score against cost (mean ± std over seeds); up and left is better"
    finish(fig, axes, comp.floor(task), title, path)


def router_curves(comp: Comparison, task: str) -> Dict[str, Dict[int, List[float]]]:
    """Per routed group: step -> the shares of validation inputs sent to the most used prompt, the
    second, ... (each run's shares sorted before the mean over seeds, so a router that collapses
    onto a different prompt in each seed still shows as collapsed)."""
    curves: Dict[str, Dict[int, List[float]]] = {}
    for group in comp.groups:
        by_step: Dict[int, List[List[float]]] = {}
        for run in comp.cell(group, task).runs:
            for event in run.curve("validation", "step"):
                shares = routing_shares(event)
                if shares is not None:
                    by_step.setdefault(event["step"], []).append(sorted(shares, reverse=True))
        if by_step:
            curves[comp.label(group)] = {
                step: [statistics.mean(col) for col in zip(*rows)] for step, rows in sorted(by_step.items())
            }
    return curves


def router_figure(curves: Dict[str, Dict[int, List[float]]], task: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(max(8, 6 * len(curves)), 4), squeeze=False)
    for ax, (label, by_step) in zip(axes[0], curves.items()):
        steps = list(by_step)
        for i in range(len(next(iter(by_step.values())))):
            rank = "most used prompt" if i == 0 else f"prompt ranked {i + 1}"
            ax.plot(steps, [100 * by_step[s][i] for s in steps], marker="o", label=rank)
        ax.set_ylim(0, 100)
        ax.set_xlabel("step")
        ax.set_ylabel("validation inputs routed to it (%)")
        ax.set_title(label)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{task}: router use over training\n(prompts ranked by use in each run, then the mean over seeds)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_figures(comp: Comparison, out: Path) -> List[str]:
    """Writes the PNG files into `out`; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    names = []
    for task in comp.tasks:
        if not any(comp.cell(g, task).n for g in comp.groups):
            continue
        for kind, draw in (("curves", curves_figure), ("pareto", pareto_figure)):
            name = f"{kind}_{task}.png"
            draw(comp, task, out / name)
            names.append(name)
        curves = router_curves(comp, task)
        if curves:
            name = f"router_{task}.png"
            router_figure(curves, task, out / name)
            names.append(name)
    return names

"""Progress a person can follow: a tqdm bar on a terminal; without one (SLURM, submitit, nohup,
`> log`) a line every `trainer.log_every` steps and one per evaluation, through the `ptlab` logger
(stdout and the run folder's train.log)."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainLine:
    """A train log line's means over its window of steps."""

    loss: float
    lr: float
    examples_per_s: float


def clock(seconds: float) -> str:
    return "?" if not math.isfinite(seconds) else time.strftime("%H:%M:%S", time.gmtime(seconds))


class Progress:
    def __init__(
        self, total: int, initial: int, enabled: bool, main_metric: str, baseline: Dict[str, Any],
        interactive: Optional[bool] = None, label: str = "",
    ) -> None:  # fmt: skip
        interactive = sys.stdout.isatty() if interactive is None else interactive
        self.lines = enabled and not interactive
        self.bar = tqdm(
            disable=not (enabled and interactive), total=total, initial=initial, desc="train",
            dynamic_ncols=True, mininterval=1.0,
        )  # fmt: skip
        self.total, self.initial, self.started = total, initial, time.perf_counter()
        self.main_metric, self.baseline = main_metric, baseline
        self.label = f"{label}: " if label else ""  # a pack's member names itself on the console

    def advance(self) -> None:
        self.bar.update(1)

    def trained(self, step: int, line: TrainLine) -> None:
        self.bar.set_postfix(loss=f"{line.loss:.4f}", refresh=False)
        if self.lines:
            elapsed = time.perf_counter() - self.started
            done = step - self.initial
            eta = elapsed / done * (self.total - step) if done else float("nan")
            log.info(
                "%sstep %d/%d  loss %.4f  lr %.3g  %.1f examples/s  elapsed %s  ETA %s",
                self.label, step, self.total, line.loss, line.lr, line.examples_per_s, clock(elapsed), clock(eta),
            )  # fmt: skip

    def evaluated(self, step: int, metrics: Dict[str, float], best: Optional[float], best_step: Optional[int]) -> None:
        """A validation result; `best` is None at a halving rung's look before any scheduled one."""
        value = metrics[self.main_metric]
        self.bar.set_postfix(**{f"val_{self.main_metric}": f"{value:.4f}"})
        if self.lines:
            shown = "  ".join(f"{name} {v:.4f}" for name, v in metrics.items() if isinstance(v, float))
            kept = "no best yet" if best is None else f"best {self.main_metric} {best:.4f} at step {best_step}"
            log.info("%sstep %d validation: %s  (%s; %s %.4f)", self.label, step, shown, kept,
                     self.baseline["name"], self.baseline[self.main_metric])  # fmt: skip

    def close(self) -> None:
        self.bar.close()

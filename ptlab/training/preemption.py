"""Preemption: SLURM sends SIGUSR1/SIGUSR2 (--signal) before its time limit and SIGTERM on
preemption. A run notes the signal, writes a resumable checkpoint at the next step boundary and
stops; a handler installed before ours (submitit's requeue) is called after the save. A packed
sweep's worker process (ptlab/sweep/places.py) also keeps a signal that comes while no pack
trains, for the next pack to stop on."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable, Dict, Optional

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(Exception):
    """Raised at a step boundary after a termination signal, once the checkpoint is written."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint saved, rerun to resume")
        self.signum, self.step = signum, step

    def __reduce__(self):  # a worker's Preempted reaches its driver whole
        return Preempted, (self.signum, self.step)


class PreemptionGuard:
    """While entered, termination signals are remembered instead of killing the process."""

    noted: Optional[int] = None  # a signal this worker process received while no pack trained

    def __init__(self) -> None:
        self.pending: Optional[int] = None
        self.previous: Dict[int, Any] = {}

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self.previous = {signum: signal.signal(signum, self.remember) for signum in PREEMPTION_SIGNALS}
        self.pending = PreemptionGuard.noted
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def remember(self, signum: int, frame) -> None:
        log.warning("received %s: checkpointing after this step", signal.Signals(signum).name)
        self.pending = signum

    def stop_if_signalled(self, save_checkpoint: Callable[[], None], step: int) -> None:
        """After a signal: save, hand the signal to the earlier handler, raise Preempted."""
        if self.pending is None:
            return
        save_checkpoint()
        signum, self.pending = self.pending, None
        log.warning("checkpoint saved at step %d after %s", step, signal.Signals(signum).name)
        handler = self.previous.get(signum)
        if callable(handler):  # in a worker: note_signal, so that its later packs stop too
            handler(signum, None)
        raise Preempted(signum, step)


def note_signal(signum: int, frame) -> None:
    """A worker process's handler while no pack trains (between packs, or while a pack opens its
    runs): the signal is kept, and the next pack checkpoints and stops at its first step."""
    log.warning("received %s: the next pack checkpoints after its first step", signal.Signals(signum).name)
    PreemptionGuard.noted = signum


def note_signals_between_packs() -> None:
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, note_signal)

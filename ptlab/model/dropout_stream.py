"""A run's place in the frozen network's addressed dropout (ptlab/model/run_dropout.py).

It holds no generator: the step it is in and the passes it has made in that step, so a run's
masks at a step are the same whether it trained the steps before in this process or resumed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ptlab.model.counter_hash import key_of


@dataclass
class DropoutStream:
    """A run's place in the dropout's address space: no state beyond the step it is in. The
    trainer sets the step (`at_step`) before each step; each training pass over the run's rows
    takes the next pass key."""

    seed: int
    rank: int = 0  # the DDP rank: each rank's rows are other rows of the run's batch
    step: int = 0
    passes: int = 0  # the run's training passes so far in this step

    def at_step(self, step: int) -> None:
        self.step, self.passes = step, 0

    def next_key(self) -> int:
        """The 32-bit key of the run's next training pass."""
        key = key_of((self.seed, self.rank, self.step, self.passes))
        self.passes += 1
        return key

"""A run's randomness, owned by the run rather than by the process.

Two streams, both from the run's seed, both saved in `checkpoints/last`:
- `generator`, a CPU `torch.Generator` for the draws ptlab makes itself while training (SMoP's
  router noise), handed to the method at build (`PromptContext.generator`). It lives on the CPU
  whatever the device, so a seed draws the same numbers on a CPU and on a GPU.
- the ambient stream, for the draws torch makes from its global default generators where no
  generator can be passed (dropout inside a method, SMoP's router dropout): `active(device)` swaps
  the run's state into the default generators around the run's own draws and takes it back.

So runs interleaved in one process, or sharing batches in a pack, each draw exactly the numbers
they would draw alone, and a resumed run continues its streams where its checkpoint left them.
Nothing here reads or seeds the global generators outside `active`. The frozen network's dropout
has no stream: its masks are addressed (ptlab/model/run_dropout.py), so it needs no state.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, List

import torch

AMBIENT_OFFSET = 1 << 62  # the ambient stream's seed: the run's, shifted out of the seeds runs are given


def default_state(device: torch.device) -> torch.Tensor:
    """The state of torch's default generator for `device` (the one dropout draws from)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_default_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RunRandomness:
    """The run's random streams (see the module's docstring), with `state_dict`/`load_state_dict`
    for its checkpoint."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.ambient: Dict[str, torch.Tensor] = {}  # device -> its default generator's state in this run

    def _ambient_devices(self, device: torch.device) -> List[torch.device]:
        """The default generators a step on `device` may draw from: the CPU's, and the GPU's."""
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return [torch.device("cpu")] if device.type == "cpu" else [torch.device("cpu"), device]

    @contextmanager
    def active(self, device: torch.device) -> Iterator[None]:
        """For the duration, torch's default generators (CPU, and `device`'s) hold this run's
        ambient stream; after, they hold what they held before and the run keeps where its stream
        got to."""
        devices = self._ambient_devices(device)
        outside = [default_state(d) for d in devices]
        for d in devices:
            if str(d) not in self.ambient:  # the run's first step here: its stream starts from its seed
                fresh = torch.Generator(d).manual_seed(self.seed + AMBIENT_OFFSET)
                self.ambient[str(d)] = fresh.get_state()
            set_default_state(d, self.ambient[str(d)])
        try:
            yield
        finally:
            for d, state in zip(devices, outside):
                self.ambient[str(d)] = default_state(d)
                set_default_state(d, state)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "seed": self.seed,
            "generator": self.generator.get_state(),
            "ambient": dict(self.ambient),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue the streams of a checkpoint (in place: the method holds `generator` itself)."""
        self.seed = state["seed"]
        self.generator.set_state(state["generator"])
        self.ambient = dict(state["ambient"])

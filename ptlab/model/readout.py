"""One run's task on a shared frozen backbone: what it reads out of the model, and how long its
inputs may be.

A `Backbone` holds only what is the model's (weights, tokenizer, placement, hooks); it serves any
number of runs and tasks, each with its own `TaskReadout`. The readout is a module because the
encoder family's linear head over pooled states is trained with the run's prompt.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, List, NamedTuple, Optional

from torch import nn

from ptlab.methods.base import PromptMethod
from ptlab.model.dropout_stream import DropoutStream


class TaskReadout(nn.Module):
    """A task's verbalizers, their target token ids, the source length and (encoder family) the head."""

    def __init__(
        self,
        verbalizers: List[str],
        choice_ids: List[List[int]],
        max_source_length: int,
        head: Optional[nn.Linear] = None,
    ) -> None:
        super().__init__()
        self.verbalizers = list(verbalizers)
        self.choice_ids = choice_ids  # per verbalizer, the token ids the backbone scores
        self.max_source_length = max_source_length
        self.head = head  # class logits over pooled states; None: the LM head scores target tokens


class RunParts(NamedTuple):
    """What the rows of one run need beside the shared backbone: its task readout, its method,
    the random streams its method draws from when it injects for its rows, and its place in the
    frozen network's dropout (a training pass with dropout on needs it)."""

    readout: TaskReadout
    method: PromptMethod
    draws: Callable[[], ContextManager] = contextlib.nullcontext
    dropout: Optional[DropoutStream] = None

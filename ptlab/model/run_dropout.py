"""The frozen network's dropout, drawn by each run from its own stream.

A batch may hold the rows of several runs (a pack), padded to widths that depend on the other
runs. So that a run's masks do not depend on its packmates, every mask element is addressed by
the run's own coordinates: its rows, and each row's *real* positions counted in order
(`rank`: 0, 1, ... over the row's non-padding positions, whatever padding lies between them).
At every dropout site of a training pass each run draws, from its own generator, a mask of its
own shape `[its rows, its widest real row, units]` (attention weights: `[rows, heads, real
queries, real keys]`), and the masks are placed into the batch's layout by rank. A run alone
takes the same draws (a pack of one), so a packed member equals its run alone and a resumed one
continues its stream from its checkpoint (`RunRandomness.dropout`).

Two kinds of site, in all three families:
- `nn.Dropout` modules on hidden states (T5, BERT) are replaced by `RunDropout`;
- the attention weights' dropout (T5, BERT, LLaMA's `attention_dropout`) runs in
  `attention_with_run_dropout`, registered with transformers' `AttentionInterface`; the model uses
  it only inside a training pass with dropout on (`FrozenDropout.laid_out`), else its own SDPA.
Eval passes and `backbone.dropout=false` are untouched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from ptlab.model.batching import Batch, rows_per_run
from ptlab.model.readout import RunParts

ATTENTION = "ptlab_run_dropout"  # the attention implementation's name inside a training pass
# where T5, BERT and LLaMA configs keep their attention weights' dropout
ATTENTION_DROPOUT_NAMES = ("dropout_rate", "attention_probs_dropout_prob", "attention_dropout")


@dataclass
class RealPositions:
    """Per row of a batch, where its real positions sit and their rank; per run, its widest row."""

    rank: torch.Tensor  # [B, L] long: a real position's rank in its row (0 at padding)
    widths: List[int]  # per run: its widest row's real positions
    aligned: bool  # every row's real positions come first (the rank is the position)

    @classmethod
    def of(cls, real: torch.Tensor, rows: Sequence[int]) -> RealPositions:
        real = real.bool()
        counts = real.sum(1)
        rank = (real.cumsum(1) - 1).clamp(min=0)
        widths = [int(part.max()) if len(part) else 0 for part in counts.split(list(rows))]
        positions = torch.arange(real.shape[1], device=real.device)
        aligned = bool((real == (positions < counts[:, None])).all())
        return cls(rank * real, widths, aligned)


def keep_mask(
    generators: Sequence[torch.Generator], rows: Sequence[int], shapes: Sequence[Tuple[int, ...]], p: float,
    device: torch.device, dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """Each run's keep mask (1/(1-p) where kept) drawn from its generator at its own shape, the
    runs' masks stacked along rows and zero-padded to the widest run's shape."""
    parts = []
    for generator, count, shape in zip(generators, rows, shapes):
        draw = torch.empty((count, *shape), device=device, dtype=dtype)
        parts.append(draw.bernoulli_(1 - p, generator=generator).div_(1 - p))
    if len(parts) == 1:
        return parts[0]
    widest = [max(part.shape[d] for part in parts) for d in range(1, parts[0].dim())]
    padded = []
    for part in parts:
        pads = [x for d in reversed(range(len(widest))) for x in (0, widest[d] - part.shape[d + 1])]
        padded.append(nn.functional.pad(part, pads))
    return torch.cat(padded)


def placed(mask: torch.Tensor, dim: int, positions: RealPositions, length: int) -> torch.Tensor:
    """`mask`, indexed by rank along `dim`, placed at each row's positions (`length` of them)."""
    if positions.aligned and mask.shape[dim] == length:
        return mask
    index = positions.rank.view(positions.rank.shape[0], *([1] * (dim - 1)), length, *([1] * (mask.dim() - dim - 1)))
    shape = list(mask.shape)
    shape[dim] = length
    return mask.gather(dim, index.expand(shape))


@dataclass
class DropoutLayout:
    """One training pass's rows: how many each run has, the runs' generators, and per stack the
    real positions of its hidden states (`[B, L]`)."""

    rows: List[int]
    generators: List[torch.Generator]
    real: Dict[str, torch.Tensor]
    positions: Dict[str, RealPositions] = field(default_factory=dict)
    keys: List[Tuple[Optional[torch.Tensor], str, RealPositions]] = field(default_factory=list)

    def of_stack(self, stack: str, length: int) -> RealPositions:
        if stack not in self.positions:
            real = self.real.get(stack)
            if real is None or real.shape[1] != length:
                raise RuntimeError(f"run dropout: no real positions of length {length} for the {stack} stack")
            self.positions[stack] = RealPositions.of(real, self.rows)
        return self.positions[stack]

    def of_keys(self, attention_mask: Optional[torch.Tensor], stack: str, queries: RealPositions,
                real_queries: torch.Tensor, length: int) -> RealPositions:  # fmt: skip
        """The real keys of an attention call: those some real query of the row may see (its
        mask, which the layers of a stack share, is worked out once)."""
        for mask, name, known in self.keys:
            if mask is attention_mask and name == stack:
                return known
        if attention_mask is None:
            visible = real_queries.new_ones(real_queries.shape[0], length)
        else:
            sees = attention_mask[:, 0] if attention_mask.dtype == torch.bool else attention_mask[:, 0] == 0
            visible = (sees & real_queries.bool()[:, :, None]).any(1) if sees.shape[1] > 1 else sees[:, 0]
        known = RealPositions.of(visible, self.rows)
        self.keys.append((attention_mask, stack, known))
        return known

    def hidden_keep(self, stack: str, hidden: torch.Tensor, p: float) -> torch.Tensor:
        """The keep mask of a hidden-state dropout site `[B, L, ...]`."""
        positions = self.of_stack(stack, hidden.shape[1])
        shapes = [(width, *hidden.shape[2:]) for width in positions.widths]
        mask = keep_mask(self.generators, self.rows, shapes, p, hidden.device, hidden.dtype)
        return placed(mask, 1, positions, hidden.shape[1])

    def attention_keep(self, stack: str, weights: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       p: float) -> torch.Tensor:  # fmt: skip
        """The keep mask of attention weights `[B, H, Lq, Lk]`."""
        _, heads, length_q, length_k = weights.shape
        queries = self.of_stack(stack, length_q)
        keys = self.of_keys(attention_mask, stack, queries, self.real[stack], length_k)
        shapes = [(heads, q, k) for q, k in zip(queries.widths, keys.widths)]
        mask = keep_mask(self.generators, self.rows, shapes, p, weights.device, weights.dtype)
        return placed(placed(mask, 2, queries, length_q), 3, keys, length_k)


class RunDropout(nn.Dropout):
    """A hidden-state dropout site whose masks come from the runs of the pass (`FrozenDropout`)."""

    def __init__(self, p: float, stack: str, owner: FrozenDropout) -> None:
        super().__init__(p)
        self.stack = stack
        self.__dict__["owner"] = owner  # not a submodule

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        layout = self.owner.layout
        if layout is None or not self.training or self.p == 0:
            return super().forward(hidden)
        return hidden * layout.hidden_keep(self.stack, hidden, self.p)


def attention_with_run_dropout(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    position_bias: Optional[torch.Tensor] = None,
    **kwargs,
):
    """Attention as transformers' eager implementation, its weights' dropout drawn per run."""
    owner, stack = module.__dict__["ptlab_dropout"]
    if key.shape[1] != query.shape[1]:  # grouped key/value heads
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if position_bias is not None:
        weights = weights + position_bias
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask
    low_precision = weights.dtype in (torch.float16, torch.bfloat16)  # as eager: softmax in fp32 there
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32 if low_precision else None).to(query.dtype)
    if dropout > 0 and owner.layout is not None:
        weights = weights * owner.layout.attention_keep(stack, weights, attention_mask, dropout)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


AttentionInterface.register(ATTENTION, attention_with_run_dropout)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, eager_mask)


class FrozenDropout:
    """A frozen model's dropout sites made per run: `laid_out(layout)` around a training pass."""

    def __init__(self, model: nn.Module, stack_of: Callable[[str], str]) -> None:
        self.model = model
        self.layout: Optional[DropoutLayout] = None
        self.streams: Dict[int, torch.Generator] = {}  # id(method) -> its run's dropout generator
        self.configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
        # the model's attention weights take dropout: only then does a pass switch its attention
        self.in_attention = any(
            (getattr(config, name, 0) or 0) > 0
            for config in self.configs.values()
            for name in ATTENTION_DROPOUT_NAMES
        )
        for name, module in list(model.named_modules()):
            if hasattr(module, "config"):
                module.__dict__["ptlab_dropout"] = (self, stack_of(name))
            for child_name, child in list(module.named_children()):
                if type(child) is nn.Dropout and child.p > 0:
                    qualified = f"{name}.{child_name}" if name else child_name
                    setattr(module, child_name, RunDropout(child.p, stack_of(qualified), self))

    @contextlib.contextmanager
    def drawing(self, streams: Dict[int, torch.Generator]) -> Iterator[None]:
        """Inside the block, a pass over a run whose method is `streams`' key draws from its value."""
        previous, self.streams = self.streams, streams
        try:
            yield
        finally:
            self.streams = previous

    @contextlib.contextmanager
    def laid_out(self, runs: Sequence[RunParts], batch: Batch, **real: torch.Tensor) -> Iterator[None]:
        """Around the model call of a training pass over the rows of `runs` in `batch`: where each
        stack's real positions are (`[B, L]` per stack), so each run's masks are its own;
        nothing changes in eval mode."""
        if not self.model.training:
            yield
            return
        methods, rows = [run.method for run in runs], rows_per_run(batch, len(runs))
        missing = [m for m in methods if id(m) not in self.streams]
        if missing:
            raise RuntimeError("a training pass with the frozen network's dropout on needs each run's "
                               "dropout stream (Backbone.frozen_dropout.drawing)")  # fmt: skip
        self.layout = DropoutLayout(list(rows), [self.streams[id(m)] for m in methods], real)
        previous = {key: config._attn_implementation_internal for key, config in self.configs.items()}
        for config in self.configs.values() if self.in_attention else ():
            config._attn_implementation_internal = ATTENTION
        try:
            yield
        finally:
            self.layout = None
            for key, config in self.configs.items():
                config._attn_implementation_internal = previous[key]


class NoFrozenDropout:
    """`backbone.dropout=false`: the frozen network stays in eval mode, so a pass draws nothing."""

    def drawing(self, streams: Dict[int, torch.Generator]) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def laid_out(self, runs: Sequence[RunParts], batch: Batch, **real: torch.Tensor) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


NO_DROPOUT = NoFrozenDropout()

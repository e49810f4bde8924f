"""The frozen network's dropout, each keep decision a pure function of its address.

A batch may hold the rows of several runs (a pack), padded to widths that depend on the other
runs. Every keep/drop of a training pass is a counter-based hash (ptlab/model/counter_hash.py) of
the element's address:
- the run's pass key: its seed, its DDP rank, the step, and the pass within the step
  (ptlab/model/dropout_stream.py: micro-batches, and the several passes of a loss such as SMoP's
  consistency);
- the row's index in its run's own batch, and the position's *real* rank in its row (0, 1, ...
  over the row's non-padding positions, whatever padding lies between them);
- the dropout site, and the unit (attention weights: the head and the query's and key's real
  ranks).

So a row's mask does not depend on its packmates or on padding (a packed member equals its run
alone by construction), a resume needs no generator state, and the masks of all rows of a pass
come out of one set of tensor ops whatever the pack's size and methods. The same address gives
the same bits on the CPU and on a GPU.

Two kinds of site, in all three families:
- `nn.Dropout` modules on hidden states (T5, BERT) are replaced by `RunDropout`;
- the attention weights' dropout (T5, BERT, LLaMA's `attention_dropout`) runs in
  `attention_with_run_dropout`, registered with transformers' `AttentionInterface`; the model uses
  it only inside a training pass with dropout on (`FrozenDropout.laid_out`), else its own SDPA.
Eval passes and `backbone.dropout=false` are untouched.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from ptlab.model.batching import Batch, row_runs
from ptlab.model.counter_hash import GOLDEN, combine, counters, keep_below, mix
from ptlab.model.readout import RunParts

ATTENTION = "ptlab_run_dropout"  # the attention implementation's name inside a training pass
# where T5, BERT and LLaMA configs keep their attention weights' dropout
ATTENTION_DROPOUT_NAMES = ("dropout_rate", "attention_probs_dropout_prob", "attention_dropout")
KEY_SALT = 0x5BD1E995  # sets the attention keys' position hashes apart from the queries'


def real_rank(real: torch.Tensor) -> torch.Tensor:
    """`[B, L]` int32: each real position's rank in its row (0 at padding)."""
    real = real.to(torch.int32)
    return (real.cumsum(1, dtype=torch.int32) - 1).clamp_(min=0).mul_(real)


def row_keys(keys: Sequence[int], run: torch.Tensor) -> torch.Tensor:
    """`[B]` int32: each row's key from its run's pass key and its index in its run's rows (`run`:
    each row's run, ascending, as `collate_runs` lays them out)."""
    first = torch.searchsorted(run, run)  # the first row of each row's run
    index = torch.arange(len(run), device=run.device) - first
    run_keys = torch.tensor(keys, dtype=torch.int32, device=run.device)[run]
    return mix(index.to(torch.int32).mul_(GOLDEN).add_(run_keys))


def position_keys(rows: torch.Tensor, rank: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """`[B, L]` int32: a hash of each row's key and each position's real rank."""
    return mix(rank.mul(GOLDEN).add_((rows ^ salt)[:, None]))


@dataclass
class DropoutLayout:
    """One training pass: each row's key (`[B]`), each stack's real positions (`[B, L]`), and the
    position hashes worked out from them, once per stack (and per attention mask for keys)."""

    rows: torch.Tensor
    real: Dict[str, torch.Tensor]
    owner: FrozenDropout
    positions: Dict[str, torch.Tensor] = field(default_factory=dict)  # stack -> [B, L, 1]
    pairs: List[Tuple[Optional[torch.Tensor], str, torch.Tensor]] = field(default_factory=list)

    def of_stack(self, stack: str, length: int) -> torch.Tensor:
        """`[B, L, 1]`: the position hashes of a stack's hidden states (and attention queries)."""
        if stack not in self.positions:
            real = self.real.get(stack)
            if real is None or real.shape[1] != length:
                raise RuntimeError(f"run dropout: no real positions of length {length} for the {stack} stack")
            self.positions[stack] = position_keys(self.rows, real_rank(real)).unsqueeze_(2)
        return self.positions[stack]

    def of_pairs(self, attention_mask: Optional[torch.Tensor], stack: str, length_q: int, length_k: int) -> torch.Tensor:
        """`[B, 1, Lq, Lk]`: each (query, key)'s hash; keys ranked among those some real query of
        the row may see (its mask, which the layers of a stack share, is worked out once)."""
        for mask, name, known in self.pairs:
            if mask is attention_mask and name == stack:
                return known
        queries = self.of_stack(stack, length_q)
        real_queries = self.real[stack].bool()
        if attention_mask is None:
            visible = real_queries.new_ones(real_queries.shape[0], length_k)
        else:
            sees = attention_mask[:, 0] if attention_mask.dtype == torch.bool else attention_mask[:, 0] == 0
            visible = (sees & real_queries[:, :, None]).any(1) if sees.shape[1] > 1 else sees[:, 0]
        keys = position_keys(self.rows, real_rank(visible), KEY_SALT)
        known = mix(queries ^ keys[:, None, :]).unsqueeze_(1)
        self.pairs.append((attention_mask, stack, known))
        return known

    def hidden_keep(self, stack: str, site: int, hidden: torch.Tensor, p: float) -> torch.Tensor:
        """The keep mask (1/(1-p) where kept, in `hidden`'s dtype) of a hidden-state site `[B, L, ...]`."""
        positions = self.of_stack(stack, hidden.shape[1])
        units = self.owner.counters(site, hidden.shape[2:], hidden.device)
        if units.dim() != 1:
            positions = positions.view(*positions.shape[:2], *[1] * units.dim())
        return self.owner.scaled(combine(positions, units) < keep_below(p), p, hidden.dtype)

    def attention_keep(self, stack: str, site: int, weights: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       p: float) -> torch.Tensor:  # fmt: skip
        """The keep mask of attention weights `[B, H, Lq, Lk]`."""
        _, heads, length_q, length_k = weights.shape
        pairs = self.of_pairs(attention_mask, stack, length_q, length_k)
        by_head = self.owner.counters(site, (heads, 1, 1), weights.device)
        return self.owner.scaled(combine(pairs, by_head) < keep_below(p), p, weights.dtype)


class RunDropout(nn.Dropout):
    """A hidden-state dropout site whose masks are addressed (`FrozenDropout`); `site`: its number
    in the model."""

    def __init__(self, p: float, stack: str, site: int, owner: FrozenDropout) -> None:
        super().__init__(p)
        self.stack, self.site = stack, site
        self.__dict__["owner"] = owner  # not a submodule

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        layout = self.owner.layout
        if layout is None or not self.training or self.p == 0:
            return super().forward(hidden)
        return hidden * layout.hidden_keep(self.stack, self.site, hidden, self.p)


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
    """Attention as transformers' eager implementation, its weights' dropout addressed per row."""
    owner, stack, site = module.__dict__["ptlab_dropout"]
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
        weights = weights * owner.layout.attention_keep(stack, site, weights, attention_mask, dropout)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


AttentionInterface.register(ATTENTION, attention_with_run_dropout)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, eager_mask)


class FrozenDropout:
    """A frozen model's dropout sites made addressed: `laid_out(runs, batch)` around a training pass."""

    def __init__(self, model: nn.Module, stack_of: Callable[[str], str]) -> None:
        self.model = model
        self.layout: Optional[DropoutLayout] = None
        self.configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
        self.cached: Dict[Tuple[int, Tuple[int, ...], str], torch.Tensor] = {}  # a site's unit hashes
        self.values: Dict[Tuple[float, torch.dtype, str], Tuple[torch.Tensor, torch.Tensor]] = {}  # mask values
        # the model's attention weights take dropout: only then does a pass switch its attention
        self.in_attention = any(
            (getattr(config, name, 0) or 0) > 0
            for config in self.configs.values()
            for name in ATTENTION_DROPOUT_NAMES
        )
        sites = itertools.count()  # every site's number, in the model's module order
        for name, module in list(model.named_modules()):
            if hasattr(module, "config"):
                module.__dict__["ptlab_dropout"] = (self, stack_of(name), next(sites))
            for child_name, child in list(module.named_children()):
                if type(child) is nn.Dropout and child.p > 0:
                    qualified = f"{name}.{child_name}" if name else child_name
                    setattr(module, child_name, RunDropout(child.p, stack_of(qualified), next(sites), self))

    def scaled(self, keep: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
        """`keep` as a mask of 1/(1-p) and 0 in `dtype` (one op: the two values are kept)."""
        key = (p, dtype, str(keep.device))
        if key not in self.values:
            self.values[key] = (torch.tensor(1.0 / (1.0 - p), dtype=dtype, device=keep.device),
                                torch.tensor(0.0, dtype=dtype, device=keep.device))  # fmt: skip
        return torch.where(keep, *self.values[key])

    def counters(self, site: int, shape: Tuple[int, ...], device: torch.device) -> torch.Tensor:
        """A site's hashes of its units (or heads), `shape`, made once per site, shape and device."""
        key = (site, tuple(shape), str(device))
        if key not in self.cached:
            count = 1
            for size in shape:
                count *= size
            self.cached[key] = counters(count, site, device).view(shape)
        return self.cached[key]

    @contextlib.contextmanager
    def laid_out(self, runs: Sequence[RunParts], batch: Batch, **real: torch.Tensor) -> Iterator[None]:
        """Around the model call of a training pass over the rows of `runs` in `batch` (each run's
        `dropout` stream gives the pass's key): where each stack's real positions are (`[B, L]`
        per stack); nothing changes in eval mode."""
        if not self.model.training:
            yield
            return
        if any(run.dropout is None for run in runs):
            raise RuntimeError("a training pass with the frozen network's dropout on needs each run's "
                               "dropout stream (RunParts.dropout)")  # fmt: skip
        rows = row_keys([r.dropout.next_key() for r in runs], row_runs(batch, len(runs)))
        self.layout = DropoutLayout(rows, real, self)
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

    def laid_out(self, runs: Sequence[RunParts], batch: Batch, **real: torch.Tensor) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


NO_DROPOUT = NoFrozenDropout()

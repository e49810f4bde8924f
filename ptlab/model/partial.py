"""FPT's partial models (Huang et al., Findings of EMNLP 2022; code: thunlp/FastPromptTuning).

A partial model keeps evenly spaced blocks (always the first, where T5 keeps its relative position
bias, and the last; the final norm is outside the blocks and stays) and, per block, the top-k FFN
neurons by importance. Shrinking swaps in a shorter block list and sliced FFN projections; growing
swaps the untouched originals back, so the full stage computes exactly the original function and
nothing is re-initialised. The frozen weights are never modified.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable, List

import torch
from torch import nn

from ptlab.errors import ConfigError
from ptlab.model.anatomy import stacks_and_ffns

log = logging.getLogger(__name__)


def evenly_spaced_layers(kept: int, total: int) -> List[int]:
    """`kept` block indices from 0 to total-1 with gaps as equal as integers allow, the shorter
    gaps first; equals the official lists (24 layers: 6 -> [0, 4, 8, 13, 18, 23])."""
    if kept >= total:
        return list(range(total))
    if kept < 2:
        raise ConfigError(
            f"a partial model keeps the first and the last block: {kept} of {total} layers is too few"
        )
    gaps = kept - 1
    short, extra = divmod(total - 1, gaps)  # total-1 = gaps*short + extra; `extra` gaps are one longer
    layers = [0]
    for gap in range(gaps):
        layers.append(layers[-1] + short + (1 if gap >= gaps - extra else 0))
    return layers


def _sliced_linear(linear: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A frozen copy of `linear` keeping the `keep` output rows (dim=0) or input columns (dim=1)."""
    keep = keep.to(linear.weight.device)
    weight = linear.weight.detach().index_select(dim, keep)
    bias = None if linear.bias is None else linear.bias.detach()[keep] if dim == 0 else linear.bias.detach()
    sliced = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        sliced.weight.copy_(weight)
        if bias is not None:
            sliced.bias.copy_(bias)
    return sliced.requires_grad_(False)


class PartialModel:
    """Switches a frozen model between its full form and partial (depth, width) forms."""

    def __init__(self, model: nn.Module, with_decoder: bool = False) -> None:
        self.model = model
        self.stacks, self.ffns = stacks_and_ffns(model, with_decoder)
        self.full_stacks = [getattr(parent, attr) for parent, attr in self.stacks]
        self.full_linears = [
            {(id(p), a): getattr(p, a) for p, a in ffn.inputs + [ffn.output]} for ffn in self.ffns
        ]
        self.ffn_width = getattr(*self.ffns[0].output).in_features
        self.scores: List[torch.Tensor] | None = None
        self.kept_layers: List[List[int]] = [list(range(len(stack))) for stack in self.full_stacks]
        self.kept_neurons = self.ffn_width

    @property
    def is_full(self) -> bool:
        return self.kept_neurons == self.ffn_width and all(
            len(k) == len(s) for k, s in zip(self.kept_layers, self.full_stacks)
        )

    def restore(self) -> None:
        """Put every original block and projection back: the full, untouched model."""
        for (parent, attr), stack in zip(self.stacks, self.full_stacks):
            setattr(parent, attr, stack)
        for ffn, originals in zip(self.ffns, self.full_linears):
            for parent, attr in ffn.inputs + [ffn.output]:
                setattr(parent, attr, originals[(id(parent), attr)])
        self.kept_layers = [list(range(len(stack))) for stack in self.full_stacks]
        self.kept_neurons = self.ffn_width

    def set_stage(self, depth: float, width: float) -> None:
        """Shrink (or grow) to `depth` of the blocks and `width` of the FFN neurons (fractions)."""
        self.restore()
        neurons = round(width * self.ffn_width)
        if neurons < self.ffn_width:
            if self.scores is None:
                raise RuntimeError("width reduction needs neuron scores: call score_neurons first")
            for ffn, scores in zip(self.ffns, self.scores):
                keep = scores.topk(neurons).indices.sort().values
                for parent, attr in ffn.inputs:
                    setattr(parent, attr, _sliced_linear(getattr(parent, attr), keep, dim=0))
                parent, attr = ffn.output
                setattr(parent, attr, _sliced_linear(getattr(parent, attr), keep, dim=1))
            self.kept_neurons = neurons
        for index, ((parent, attr), stack) in enumerate(zip(self.stacks, self.full_stacks)):
            kept = max(min(2, len(stack)), round(depth * len(stack)))  # at least the first and the last
            layers = evenly_spaced_layers(kept, len(stack))
            if len(layers) < len(stack):
                setattr(parent, attr, nn.ModuleList([stack[i] for i in layers]))
            self.kept_layers[index] = layers

    @torch.no_grad()
    def score_neurons(self, run_batches: Callable[[], Iterable]) -> List[torch.Tensor]:
        """Importance of every FFN neuron: mean |activation| (the input of the output projection)
        over the non-padding positions of the forward passes that iterating `run_batches()` makes.
        The attention mask of each pass is read off the model's own inputs."""
        self.restore()
        sums = [torch.zeros(self.ffn_width) for _ in self.ffns]
        counts = [torch.zeros(()) for _ in self.ffns]
        first_stack_ffns = len(self.full_stacks[0])
        current = {}

        def remember_mask(module, args, kwargs):
            current["mask"] = kwargs.get("attention_mask")

        def record(i, activation):
            activation = activation.detach().abs().float()
            mask = current.get("mask")
            if mask is None:
                raise RuntimeError(
                    "neuron scoring saw a pass without an attention mask: run it under "
                    "backbone.per_example_prompt_states() so every position of every example counts"
                )
            if i >= first_stack_ffns:  # T5's decoder blocks: every target position counts
                mask = torch.ones(activation.shape[:2], device=activation.device)
            else:  # a causal LM's mask also covers a per-layer prefix in front: the last T columns
                mask = mask[:, -activation.shape[1] :]
            sums[i] += (activation * mask.unsqueeze(-1).to(activation)).sum((0, 1)).cpu()
            counts[i] += mask.sum().cpu()

        hooks = [
            module.register_forward_pre_hook(remember_mask, with_kwargs=True)
            for module in {id(m): m for m in (self.model, self.model.base_model)}.values()
        ]
        for i, ffn in enumerate(self.ffns):
            hooks.append(
                getattr(*ffn.output).register_forward_pre_hook(
                    lambda module, inputs, i=i: record(i, inputs[0])
                )
            )
        try:
            for _ in run_batches():
                pass
        finally:
            for hook in hooks:
                hook.remove()
        self.scores = [total / count.clamp(min=1) for total, count in zip(sums, counts)]
        return self.scores

    def stage_facts(self) -> Dict[str, object]:
        return {"kept_layers": [list(k) for k in self.kept_layers], "ffn_neurons": self.kept_neurons}

"""`trainer.compile=true`: every transformer block through `torch.compile`."""

from __future__ import annotations

from torch import nn

from ptlab.model.anatomy import transformer_blocks


def compile_blocks(model: nn.Module) -> int:
    """Compile every transformer block in place (dynamic shapes, as batches pad dynamically); the
    code around the blocks stays eager. Returns the number of blocks."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)

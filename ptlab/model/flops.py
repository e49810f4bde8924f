"""Analytic FLOPs of a training step, from the model config and the batch's shapes.

Counted (a multiply-add = 2 FLOPs), per transformer block over T positions with model width d,
attention width a (heads x head dim), key/value width k (smaller with grouped queries), FFN width
f with 1 input projection (2 when gated):
  projections 2T(2da + 2dk), attention scores and mixing 4T^2 a, FFN 2Tdf(inputs + 1);
cross-attention over C positions adds 2T(2da) + 2C(2dk) + 4TCa; an LM head costs 2TdV on the
positions scored. Per-layer prefixes of n positions (deep prompts) add attention to n more keys
in each block of their stack: 4Tna. Embedding lookups, norms and softmaxes are left out (< 1% at
these sizes), and so is a method's own compute before the prefixes (once per batch).
How a family's stacks put these together is the family's own `forward_flops` (model/families/).
A training step with a frozen backbone = forward + the backward pass for activation gradients
(no weight gradients) = 2 x forward. Partial models (FPT) count their kept blocks and neurons
(`ModelShape.shrunk`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

from ptlab.model.anatomy import layout_of


@dataclass(frozen=True)
class ModelShape:
    d: int
    attn: int
    kv: int
    ffn: int
    ffn_inputs: int
    vocab: int
    encoder_layers: int  # the encoder's blocks, or a causal LM's
    decoder_layers: int  # seq2seq only; 0 otherwise
    decoder_ffn: int  # the decoder's FFN width (a partial model may cut only the encoder's)

    @classmethod
    def from_config(cls, config) -> ModelShape:
        layout = layout_of(config)
        heads, kv_heads, head_dim = layout.attention(config)
        ffn, ffn_inputs = layout.ffn_shape(config)
        encoder_layers, decoder_layers = layout.layers(config)
        return cls(layout.width(config), heads * head_dim, kv_heads * head_dim, ffn, ffn_inputs,
                   config.vocab_size, encoder_layers, decoder_layers, ffn)  # fmt: skip

    def shrunk(self, encoder_layers: int, decoder_layers: int, ffn: int, decoder_ffn: int) -> ModelShape:
        """A partial model's shape (FPT): its kept blocks and FFN neurons."""
        return replace(self, encoder_layers=encoder_layers, decoder_layers=decoder_layers, ffn=ffn,
                       decoder_ffn=decoder_ffn)  # fmt: skip


@dataclass(frozen=True)
class BatchSizes:
    """A batch's sizes that a step's FLOPs depend on."""

    rows: int
    source_tokens: int  # padded, the prompt included
    target_tokens: int  # padded
    shared_prompt: int = 0  # leading prompt tokens run once per batch (a causal LM's shared prompt)
    prefixes: Mapping[str, int] = field(default_factory=dict)  # per-layer prefix positions by stack

    def prefix(self, stack: str) -> int:
        """The per-layer prefix positions in `stack` (`encoder`, `decoder`: a causal LM's layers)."""
        return self.prefixes.get(stack, 0)


def block_flops(shape: ModelShape, tokens: int, ffn: int, context: int = 0, cached: int = 0) -> float:
    """One block over `tokens` positions that also attend to `cached` earlier ones (a shared
    prompt's keys/values); `context` > 0 adds cross-attention to that many positions."""
    d, a, k = shape.d, shape.attn, shape.kv
    flops = (
        2 * tokens * (2 * d * a + 2 * d * k)
        + 4 * tokens * (tokens + cached) * a
        + 2 * tokens * d * ffn * (shape.ffn_inputs + 1)
    )
    if context:
        flops += 2 * tokens * 2 * d * a + 2 * context * 2 * d * k + 4 * tokens * context * a
    return flops


def lm_head_flops(shape: ModelShape, tokens: int) -> float:
    """The LM head's product on `tokens` scored positions."""
    return 2 * tokens * shape.d * shape.vocab

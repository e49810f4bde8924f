"""Analytic FLOPs of a training step, from the model config and the batch's shapes.

Counted (a multiply-add = 2 FLOPs), per transformer block over T positions with model width d,
attention width a (heads x head dim), key/value width k (smaller with grouped queries), FFN width
f with 1 input projection (2 when gated):
  projections 2T(2da + 2dk), attention scores and mixing 4T^2 a, FFN 2Tdf(inputs + 1);
T5 decoder blocks add cross-attention over the encoder's positions; the LM head costs 2TdV on the
positions scored; a causal LM runs a shared prompt once per batch and the rest attends to its
cached keys/values. Per-layer prefixes of n positions (deep prompts) add attention to n more keys
in each block of their stack: 4Tna. Embedding lookups, norms and softmaxes are left out (< 1% at
these sizes), and so is a method's own compute before the prefixes (once per batch).
A training step with a frozen backbone = forward + the backward pass for activation gradients
(no weight gradients) = 2 x forward. Partial models (FPT) count their kept blocks and neurons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from ptlab.model.anatomy import layout_of


@dataclass(frozen=True)
class ModelShape:
    d: int
    attn: int
    kv: int
    ffn: int
    ffn_inputs: int
    vocab: int
    encoder_layers: int
    decoder_layers: int  # seq2seq only; 0 otherwise

    @classmethod
    def from_config(cls, config, family: str) -> ModelShape:
        layout = layout_of(config)
        heads, kv_heads, head_dim = layout.attention(config)
        ffn, ffn_inputs = layout.ffn_shape(config, family)
        encoder_layers, decoder_layers = layout.layers(config)
        return cls(layout.width(config), heads * head_dim, kv_heads * head_dim, ffn, ffn_inputs,
                   config.vocab_size, encoder_layers, decoder_layers)  # fmt: skip


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


def train_step_flops(
    shape: ModelShape,
    family: str,
    batch: int,
    source_tokens: int,
    target_tokens: int,
    encoder_layers: int | None = None,
    decoder_layers: int | None = None,
    ffn: int | None = None,
    decoder_ffn: int | None = None,
    shared_prompt: int = 0,
    prefixes: Optional[Mapping[str, int]] = None,
) -> float:
    """FLOPs of one training step on `batch` sequences of the given (padded) lengths, the prompt
    included in `source_tokens`; layer and FFN counts default to the full model's.
    `shared_prompt`: that many leading (prompt) tokens run once per batch, not per example
    (causal backbones with a prompt shared by every input). `prefixes`: positions of the per-layer
    prefix in each stack (`encoder`, `decoder`; a causal LM's layers are its `decoder`)."""
    ffn = shape.ffn if ffn is None else ffn
    decoder_ffn = shape.ffn if decoder_ffn is None else decoder_ffn
    encoder_layers = shape.encoder_layers if encoder_layers is None else encoder_layers
    decoder_layers = shape.decoder_layers if decoder_layers is None else decoder_layers
    prefix = {"encoder": 0, "decoder": 0, **(prefixes or {})}
    if family == "seq2seq":
        forward = encoder_layers * block_flops(shape, source_tokens, ffn, cached=prefix["encoder"])
        forward += decoder_layers * block_flops(
            shape, target_tokens, decoder_ffn, context=source_tokens, cached=prefix["decoder"]
        )
        forward += 2 * target_tokens * shape.d * shape.vocab
    elif family == "causal":
        rest = source_tokens + target_tokens - 1 - shared_prompt  # the last target is only predicted
        cached = prefix["decoder"] + shared_prompt
        forward = encoder_layers * block_flops(shape, rest, ffn, cached=cached)
        forward += 2 * target_tokens * shape.d * shape.vocab
        once = encoder_layers * block_flops(shape, shared_prompt, ffn, cached=prefix["decoder"])
        return 2.0 * (batch * forward + once)
    else:
        forward = encoder_layers * block_flops(shape, source_tokens, ffn, cached=prefix["encoder"])
    return 2.0 * batch * forward

"""Where each supported model family keeps its transformer blocks and their feed-forward layers:
what FPT's partial models shrink, what `trainer.compile` compiles and where deep prompts go."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

from torch import nn

from ptlab.errors import ConfigError


@dataclass
class FFN:
    """One block's feed-forward: the projections into the hidden width and the one out of it."""

    inputs: List[Tuple[nn.Module, str]]  # (parent, attribute) of each d -> f Linear (two if gated)
    output: Tuple[nn.Module, str]  # (parent, attribute) of the f -> d Linear


def stacks_and_ffns(model: nn.Module, with_decoder: bool) -> Tuple[List[Tuple[nn.Module, str]], List[FFN]]:
    """Where the block lists and the FFNs of each supported family live."""
    kind = model.config.model_type
    if kind in ("t5", "mt5", "umt5"):
        stacks = [(model.encoder, "block")] + ([(model.decoder, "block")] if with_decoder else [])
        ffns = []
        for parent, attr in stacks:
            for block in getattr(parent, attr):
                dense = block.layer[-1].DenseReluDense
                names = ["wi_0", "wi_1"] if hasattr(dense, "wi_0") else ["wi"]
                ffns.append(FFN([(dense, n) for n in names], (dense, "wo")))
        return stacks, ffns
    if kind in ("llama", "mistral", "qwen2", "qwen3"):
        stacks = [(model.base_model, "layers")]
        ffns = [
            FFN([(b.mlp, "gate_proj"), (b.mlp, "up_proj")], (b.mlp, "down_proj"))
            for b in model.base_model.layers
        ]
        return stacks, ffns
    if kind in ("bert", "roberta"):
        stacks = [(model.encoder, "layer")]
        ffns = [FFN([(b.intermediate, "dense")], (b.output, "dense")) for b in model.encoder.layer]
        return stacks, ffns
    raise ConfigError(
        f"model_type={kind!r}: ptlab knows the blocks of t5, llama and bert models only, which "
        "partial models (schedule=fpt) and trainer.compile=true need"
    )


def transformer_blocks(model: nn.Module) -> List[nn.Module]:
    """Every transformer block of the model, the decoder's too."""
    stacks, _ = stacks_and_ffns(model, with_decoder=True)
    return [block for parent, attr in stacks for block in getattr(parent, attr)]


def self_attentions(model: nn.Module) -> Dict[str, List[nn.Module]]:
    """Each stack's self-attention modules in layer order, by the stack's name (`encoder`: T5's
    and BERT's bidirectional one; `decoder`: T5's decoder, a causal LM's layers): where per-layer
    key/value prefixes go."""
    kind = model.config.model_type
    if kind in ("t5", "mt5", "umt5"):
        return {
            name: [block.layer[0].SelfAttention for block in getattr(model, name).block]
            for name in ("encoder", "decoder")
        }
    if kind in ("llama", "mistral", "qwen2", "qwen3"):
        return {"decoder": [layer.self_attn for layer in model.base_model.layers]}
    if kind in ("bert", "roberta"):
        return {"encoder": [layer.attention.self for layer in model.base_model.encoder.layer]}
    raise ConfigError(
        f"model_type={kind!r}: ptlab knows the attention layers of t5, llama and bert models only, "
        "which per-layer prefixes (method=deep_prompt) need"
    )


def key_value_heads(config) -> Tuple[int, int]:
    """(key/value heads, head width) of one attention layer; fewer key/value heads than query
    heads with grouped-query attention."""
    if config.model_type in ("t5", "mt5", "umt5"):
        return config.num_heads, config.d_kv
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return getattr(config, "num_key_value_heads", None) or heads, head_dim


def key_value_projections(attention: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """The Linear layers an attention module computes its keys and values with (before any
    rotary embedding, which bidirectional encoders here do not use)."""
    for key, value in (("k", "v"), ("key", "value"), ("k_proj", "v_proj")):
        if hasattr(attention, key) and hasattr(attention, value):
            return getattr(attention, key), getattr(attention, value)
    raise ConfigError(f"{type(attention).__name__}: ptlab does not know its key and value projections")

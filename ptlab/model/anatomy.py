"""Where each supported kind of transformer keeps its blocks, feed-forward layers and attention:
what FPT's partial models shrink, what `trainer.compile` compiles, where deep prompts go and what
the FLOPs model counts. One `Layout` per kind, found by the model config's `model_type`; adding a
kind of model is one subclass here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

from torch import nn

from ptlab.errors import ConfigError

Place = Tuple[nn.Module, str]  # (parent module, attribute name)


@dataclass
class FFN:
    """One block's feed-forward: the projections into the hidden width and the one out of it."""

    inputs: List[Place]  # (parent, attribute) of each d -> f Linear (two if gated)
    output: Place  # (parent, attribute) of the f -> d Linear


class Layout:
    """The shapes every Hugging Face transformer config states (hidden_size, num_attention_heads,
    ...), for model types ptlab knows only the sizes of; subclasses know where the modules are."""

    model_types: Tuple[str, ...] = ()

    def width(self, config) -> int:
        return config.hidden_size

    def attention(self, config) -> Tuple[int, int, int]:
        """(query heads, key/value heads, head width): fewer key/value heads with grouped queries."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return heads, getattr(config, "num_key_value_heads", None) or heads, head_dim

    def ffn_shape(self, config) -> Tuple[int, int]:
        """(FFN width, input projections: 2 when gated; a kind ptlab knows only the sizes of counts
        as ungated)."""
        return config.intermediate_size, 1

    def layers(self, config) -> Tuple[int, int]:
        """(encoder or only stack's blocks, decoder blocks: 0 without a decoder)."""
        return config.num_hidden_layers, 0

    def stacks(self, model: nn.Module, with_decoder: bool) -> List[Place]:
        raise ConfigError(
            f"model_type={model.config.model_type!r}: ptlab knows the blocks of t5, llama and bert models "
            "only, which partial models (stages=fpt) and trainer.compile=true need"
        )

    def ffn(self, block: nn.Module) -> FFN:
        raise NotImplementedError

    def self_attentions(self, model: nn.Module) -> Dict[str, List[nn.Module]]:
        raise ConfigError(
            f"model_type={model.config.model_type!r}: ptlab knows the attention layers of t5, llama and "
            "bert models only, which per-layer prefixes (method=deep_prompt) need"
        )


class T5Layout(Layout):
    model_types = ("t5", "mt5", "umt5")

    def width(self, config) -> int:
        return config.d_model

    def attention(self, config) -> Tuple[int, int, int]:
        return config.num_heads, config.num_heads, config.d_kv

    def ffn_shape(self, config) -> Tuple[int, int]:
        return config.d_ff, 2 if config.feed_forward_proj.startswith("gated") else 1

    def layers(self, config) -> Tuple[int, int]:
        return config.num_layers, config.num_decoder_layers

    def stacks(self, model: nn.Module, with_decoder: bool) -> List[Place]:
        return [(model.encoder, "block")] + ([(model.decoder, "block")] if with_decoder else [])

    def ffn(self, block: nn.Module) -> FFN:
        dense = block.layer[-1].DenseReluDense
        names = ["wi_0", "wi_1"] if hasattr(dense, "wi_0") else ["wi"]
        return FFN([(dense, name) for name in names], (dense, "wo"))

    def self_attentions(self, model: nn.Module) -> Dict[str, List[nn.Module]]:
        return {
            name: [block.layer[0].SelfAttention for block in getattr(model, name).block]
            for name in ("encoder", "decoder")
        }


class LlamaLayout(Layout):
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def ffn_shape(self, config) -> Tuple[int, int]:
        return config.intermediate_size, 2  # gate_proj and up_proj

    def stacks(self, model: nn.Module, with_decoder: bool) -> List[Place]:
        return [(model.base_model, "layers")]

    def ffn(self, block: nn.Module) -> FFN:
        return FFN([(block.mlp, "gate_proj"), (block.mlp, "up_proj")], (block.mlp, "down_proj"))

    def self_attentions(self, model: nn.Module) -> Dict[str, List[nn.Module]]:
        return {"decoder": [layer.self_attn for layer in model.base_model.layers]}


class BertLayout(Layout):
    model_types = ("bert", "roberta")

    def stacks(self, model: nn.Module, with_decoder: bool) -> List[Place]:
        return [(model.base_model.encoder, "layer")]

    def ffn(self, block: nn.Module) -> FFN:
        return FFN([(block.intermediate, "dense")], (block.output, "dense"))

    def self_attentions(self, model: nn.Module) -> Dict[str, List[nn.Module]]:
        return {"encoder": [layer.attention.self for layer in model.base_model.encoder.layer]}


LAYOUTS = {
    kind: layout for layout in (T5Layout(), LlamaLayout(), BertLayout()) for kind in layout.model_types
}


def layout_of(config) -> Layout:
    """The layout of a model config's `model_type` (the generic shapes for one ptlab does not know)."""
    return LAYOUTS.get(config.model_type, Layout())


def stacks_and_ffns(model: nn.Module, with_decoder: bool) -> Tuple[List[Place], List[FFN]]:
    """Where the block lists and the FFNs of the model live."""
    layout = layout_of(model.config)
    stacks = layout.stacks(model, with_decoder)
    return stacks, [layout.ffn(block) for parent, attr in stacks for block in getattr(parent, attr)]


def transformer_blocks(model: nn.Module) -> List[nn.Module]:
    """Every transformer block of the model, the decoder's too."""
    return [
        block
        for parent, attr in layout_of(model.config).stacks(model, True)
        for block in getattr(parent, attr)
    ]


def self_attentions(model: nn.Module) -> Dict[str, List[nn.Module]]:
    """Each stack's self-attention modules in layer order, by the stack's name (`encoder`: T5's
    and BERT's bidirectional one; `decoder`: T5's decoder, a causal LM's layers): where per-layer
    key/value prefixes go."""
    return layout_of(model.config).self_attentions(model)


def key_value_heads(config) -> Tuple[int, int]:
    """(key/value heads, head width) of one attention layer."""
    _, kv_heads, head_dim = layout_of(config).attention(config)
    return kv_heads, head_dim


def key_value_projections(attention: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """The Linear layers an attention module computes its keys and values with (before any
    rotary embedding, which bidirectional encoders here do not use)."""
    for key, value in (("k", "v"), ("key", "value"), ("k_proj", "v_proj")):
        if hasattr(attention, key) and hasattr(attention, value):
            return getattr(attention, key), getattr(attention, value)
    raise ConfigError(f"{type(attention).__name__}: ptlab does not know its key and value projections")

"""Deep prompts: trained keys and values in every layer (P-tuning v2, Liu et al. ACL 2022; prefix
tuning, Li & Liang ACL 2021; code: THUDM/P-tuning-v2, huggingface/peft PrefixTuning).

Per stack, one table of n rows holds every layer's prefix: row i is [layer 0 key, layer 0 value,
layer 1 key, ...] of prefix position i, each kv_heads x head_dim wide (PEFT's layout, so its
weights load as they are). `reparam=true` is prefix tuning's reparameterisation: the table is the
output of an MLP over n trained d-wide embeddings, Linear(d, h) -> tanh -> Linear(h, layers*2*kv),
used while training only; `export_prompt` folds it into the plain table.

Init: `random` draws the table from N(0, 1), as P-tuning v2 and PEFT do. `activations` is prefix
tuning's real-word init (Li & Liang, sec. 7.2): the keys and values n sampled vocabulary tokens
produce in each layer when run alone through the frozen model. On a causal LM that is exactly the
cache of prompt tuning's vocabulary-initialised prompt, so the deep prompt starts as that prompt.

Parameters per stack: layers x 2 x n x kv_width (= d without grouped-query attention), plus with
`reparam` n*d + (d+1)*h + (h+1)*layers*2*kv_width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ptlab.errors import ConfigError, check_choice
from ptlab.methods import register
from ptlab.methods.base import (
    KeyValue,
    MethodConfig,
    PromptContext,
    PromptInjection,
    PromptMethod,
    StackShape,
    sample_token_ids,
    seeded_init,
)

STACKS = ("encoder", "decoder")


@dataclass
class DeepPromptConfig(MethodConfig):
    name: str = "deep_prompt"
    prompt_length: int = 20  # n: prefix positions in every layer
    reparam: bool = False  # prefix tuning's MLP over n embeddings (P-tuning v2: off)
    reparam_hidden: int = 512  # h, the MLP's hidden width (P-tuning v2's prefix_hidden_size)
    # the stacks that get prefixes; null: the input's (T5's and BERT's encoder, a causal LM's
    # layers, called `decoder`); [decoder] on T5 is where HuggingFace PEFT puts them
    stacks: Optional[List[str]] = None
    dropout: float = 0.0  # on the prefixes while training (P-tuning v2 uses the model's, 0.1)
    init: str = "random"  # random: N(0, 1) | activations: real tokens' keys and values (see above)
    init_vocab_top: Optional[int] = 5000  # activations: tokens drawn from the first ids (null: all)

    def __post_init__(self) -> None:
        check_choice("method.init", self.init, ("random", "activations"))
        if self.init == "activations" and self.reparam:
            raise ConfigError(
                "method.init=activations sets the prefix table, which method.reparam=true computes with "
                "an MLP: use one of them"
            )
        if self.prompt_length < 1:
            raise ConfigError(f"method.prompt_length={self.prompt_length} must be >= 1")
        if self.reparam_hidden < 1:
            raise ConfigError(f"method.reparam_hidden={self.reparam_hidden} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"method.dropout={self.dropout} must be in [0, 1)")
        for stack in self.stacks or []:
            if stack not in STACKS:
                raise ConfigError(f"method.stacks: {stack!r} is not a stack; choose from {list(STACKS)}")
        if self.stacks is not None and (not self.stacks or len(set(self.stacks)) != len(self.stacks)):
            raise ConfigError(f"method.stacks={self.stacks} must name each stack once, at least one")

    def row_layout(self) -> Tuple:
        return ("prefixes", self.prompt_length, tuple(self.stacks or ()))


def reparam_mlp(config: DeepPromptConfig, hidden: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden, config.reparam_hidden), nn.Tanh(), nn.Linear(config.reparam_hidden, width)
    )


def table_of(layers: List[KeyValue]) -> torch.Tensor:
    """The `[n, layers*2*kv_width]` table holding per-layer (key, value) pairs `[1, heads, n, head_dim]`."""
    rows = [tensor[0].permute(1, 0, 2) for pair in layers for tensor in pair]  # each [n, heads, head_dim]
    return torch.stack(rows, 1).flatten(1).detach().float().clone()


class StackPrefix(nn.Module):
    """One stack's prefixes: the `[n, layers*2*kv_width]` table, or the MLP that computes it."""

    def __init__(
        self, config: DeepPromptConfig, shape: StackShape, hidden: int, initial: Optional[List[KeyValue]] = None
    ) -> None:
        super().__init__()
        self.shape, self.length = shape, config.prompt_length
        width = shape.layers * 2 * shape.kv_width
        if config.reparam:  # as PEFT's PrefixEncoder: embeddings N(0, 1), PyTorch's Linear init
            self.embedding = nn.Parameter(torch.randn(config.prompt_length, hidden))
            self.mlp = reparam_mlp(config, hidden, width)
        elif initial is not None:
            self.table = nn.Parameter(table_of(initial))
        else:
            self.table = nn.Parameter(torch.randn(config.prompt_length, width))
        self.dropout = nn.Dropout(config.dropout)

    def rows(self) -> torch.Tensor:
        return self.mlp(self.embedding) if hasattr(self, "mlp") else self.table

    def layers(self) -> List[KeyValue]:
        """(key, value) of each layer, each `[1, kv_heads, n, head_dim]`."""
        n, shape = self.length, self.shape
        rows = self.dropout(self.rows()).view(n, shape.layers * 2, shape.kv_heads, shape.head_dim)
        per_layer = rows.permute(1, 2, 0, 3).unsqueeze(1)  # [layers*2, 1, heads, n, head_dim]
        return [(per_layer[2 * i], per_layer[2 * i + 1]) for i in range(shape.layers)]


def initial_activations(
    config: DeepPromptConfig, context: PromptContext, stacks: List[str]
) -> Dict[str, List[KeyValue]]:
    """Each stack's keys and values of n vocabulary tokens (drawn as prompt tuning's vocab init)."""
    ids = sample_token_ids(context, config.prompt_length, config.init_vocab_top, context.seed)
    computed = context.token_key_values(ids) if context.token_key_values else {}
    missing = [stack for stack in stacks if stack not in computed]
    if missing:
        raise ConfigError(
            f"method.init=activations: ptlab cannot compute the {missing[0]} stack's keys and values "
            "of tokens run alone (T5's decoder needs an encoder input): use method.init=random there"
        )
    return computed


@register("deep_prompt", DeepPromptConfig)
class DeepPrompt(PromptMethod):
    peft_export = "prefix_tuning"  # causal backbones only (ptlab.lab.export)

    def __init__(self, config: DeepPromptConfig, context: PromptContext) -> None:
        super().__init__()
        stacks = config.stacks or [context.input_stack]
        for stack in stacks:
            if stack not in context.stacks:
                known = (
                    sorted(context.stacks) or "none: ptlab knows the attention of t5, llama and bert models"
                )
                raise ConfigError(
                    f"method.stacks: this backbone has no {stack} stack to prefix (it has: {known})"
                )
        self.prefix_length = config.prompt_length
        self.prefix_stacks = tuple(stacks)
        initial = initial_activations(config, context, stacks) if config.init == "activations" else {}
        with seeded_init(context.seed):
            self.stacks = nn.ModuleDict(
                {
                    stack: StackPrefix(config, context.stacks[stack], context.hidden_size, initial.get(stack))
                    for stack in stacks
                }
            )

    def inject(self, source_embeds: torch.Tensor, source_mask: torch.Tensor) -> PromptInjection:
        return PromptInjection(prefixes={name: stack.layers() for name, stack in self.stacks.items()})

    def export_prompt(self) -> Dict[str, torch.Tensor]:
        """Each stack's plain `[n, layers*2*kv_width]` table (PEFT's prefix embedding), MLP folded in."""
        with torch.no_grad():
            return {
                f"{name}.prefix": stack.rows().detach().cpu().contiguous()
                for name, stack in self.stacks.items()
            }

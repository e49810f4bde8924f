"""Baseline soft prompt tuning (Lester et al., 2021): one trainable `[n, d]` matrix for all inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ptlab.errors import ConfigError, check_choice
from ptlab.methods import register
from ptlab.methods.base import MethodConfig, PromptContext, SharedPromptMethod, sample_token_ids


@dataclass
class PromptTuningConfig(MethodConfig):
    name: str = "prompt_tuning"
    prompt_length: int = 20
    # random | vocab | text | labels (methods.md, "Init options")
    init: str = "vocab"
    # random init: uniform in +-sqrt(1/d) (as FPT) or normal N(0, 1) (as PEFT's RANDOM)
    random_dist: str = "uniform"
    # vocab init: draw from the first `init_vocab_top` token ids (null: the whole vocabulary)
    init_vocab_top: Optional[int] = 5000
    init_text: Optional[str] = None

    def __post_init__(self) -> None:
        if self.prompt_length < 1:
            raise ConfigError(f"method.prompt_length={self.prompt_length} must be >= 1")
        check_choice("method.init", self.init, ("random", "vocab", "text", "labels"))
        check_choice("method.random_dist", self.random_dist, ("uniform", "normal"))
        if self.init == "text" and not self.init_text:
            raise ConfigError("method.init=text needs method.init_text='...'")


def initial_prompt(config: PromptTuningConfig, context: PromptContext, length: int) -> torch.Tensor:
    """The `[length, d]` starting values for a prompt under the configured init option."""
    embeddings = context.input_embeddings.detach().float()
    generator = torch.Generator().manual_seed(context.seed)
    if config.init == "random":
        if config.random_dist == "normal":
            return torch.randn(length, context.hidden_size, generator=generator)
        bound = math.sqrt(1.0 / context.hidden_size)
        return (torch.rand(length, context.hidden_size, generator=generator) * 2 - 1) * bound
    if config.init == "vocab":
        return embeddings[sample_token_ids(context, length, config.init_vocab_top, context.seed)].clone()
    if config.init == "text":
        ids = context.tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
    else:  # labels: verbalizer tokens first, then vocab samples (Lester et al. 2021, sec. 3)
        ids = [
            i
            for text in context.label_texts
            for i in context.tokenizer(text, add_special_tokens=False)["input_ids"]
        ]
        ids = ids[:length]
        extra = sample_token_ids(context, length - len(ids), config.init_vocab_top, context.seed)
        ids = ids + extra.tolist()
    if not ids:
        raise ConfigError(f"method.init_text={config.init_text!r} tokenizes to nothing")
    repeats = math.ceil(length / len(ids))
    return embeddings[torch.tensor((ids * repeats)[:length])].clone()


@register("prompt_tuning", PromptTuningConfig)
class PromptTuning(SharedPromptMethod):
    def __init__(self, config: PromptTuningConfig, context: PromptContext) -> None:
        super().__init__()
        self.num_tokens = config.prompt_length
        self.prompt_embeds = nn.Parameter(initial_prompt(config, context, config.prompt_length))

    def prompt(self) -> torch.Tensor:
        return self.prompt_embeds

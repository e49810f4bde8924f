"""SuperPos-Prompt (Sadraei Javaheri et al., NeurIPS ENLSP 2024): each prompt token is a learned
superposition of m sampled vocabulary embeddings.

    p_i = (E_freeze + dE) w_i,   E_freeze in R[d, m] frozen, dE in R[d, m] from 0, w_i in R[m]

A linear map without bias: no softmax, no non-linearity (both hurt badly in the paper's ablation).
The m token ids are drawn once with a fixed seed, the same for every task, and saved with the
prompt. Switching off the frozen network's dropout is part of the method (conf/method/superpos.yaml
sets `backbone.dropout: false`).

*Unverified* (no public code), options with the best reading as default: dE shared by all prompt
tokens (`per_token_delta=false`); w initialised small and random (`weight_init=random`, uniform in
+-1/sqrt(m), so a prompt token starts as a mix of real embeddings with about their norm) or one-hot
on a sampled token (`weight_init=one_hot`, exactly vocab init).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ptlab.errors import ConfigError, check_choice
from ptlab.methods import register
from ptlab.methods.base import MethodConfig, PromptContext, SharedPromptMethod, sample_token_ids


@dataclass
class SuperPosConfig(MethodConfig):
    name: str = "superpos"
    prompt_length: int = 10
    num_vocab_samples: int = 128  # m
    sample_seed: int = 42  # fixed: the same m tokens for every task and run
    per_token_delta: bool = False
    weight_init: str = "random"  # random | one_hot

    def __post_init__(self) -> None:
        if self.prompt_length < 1:
            raise ConfigError(f"method.prompt_length={self.prompt_length} must be >= 1")
        if self.num_vocab_samples < 1:
            raise ConfigError(f"method.num_vocab_samples={self.num_vocab_samples} must be >= 1")
        check_choice("method.weight_init", self.weight_init, ("random", "one_hot"))


@register("superpos", SuperPosConfig)
class SuperPosPrompt(SharedPromptMethod):
    backbone_dropout = False  # the paper's setting: > 7 points lost with dropout on (T5 v1.1 LM-adapt)

    def __init__(self, config: SuperPosConfig, context: PromptContext) -> None:
        super().__init__()
        m, n, d = config.num_vocab_samples, config.prompt_length, context.hidden_size
        usable = context.vocab_size - len(set(context.special_token_ids))
        if m > usable:
            raise ConfigError(
                f"method.num_vocab_samples={m} exceeds the backbone's {usable} non-special tokens: lower it"
            )
        self.num_tokens = n
        token_ids = sample_token_ids(context, m, top=None, seed=config.sample_seed)
        self.register_buffer("token_ids", token_ids)
        self.register_buffer(
            "frozen_embeddings", context.input_embeddings.detach().float()[token_ids].T.clone()
        )  # [d, m]
        self.delta = nn.Parameter(torch.zeros(n, d, m) if config.per_token_delta else torch.zeros(d, m))
        generator = torch.Generator().manual_seed(context.seed)
        if config.weight_init == "one_hot":
            weights = torch.zeros(n, m)
            weights[torch.arange(n), torch.randint(m, (n,), generator=generator)] = 1.0
        else:
            weights = (torch.rand(n, m, generator=generator) * 2 - 1) / math.sqrt(m)
        self.weights = nn.Parameter(weights)

    def prompt(self) -> torch.Tensor:
        """The `[n, d]` prompt: row i is (E_freeze + dE[_i]) w_i."""
        if self.delta.dim() == 3:
            return torch.einsum("ndm,nm->nd", self.frozen_embeddings + self.delta, self.weights)
        return self.weights @ (self.frozen_embeddings + self.delta).T

    def export_prompt(self):
        return {"prompt_embeds": self.injected_prompt().detach().cpu().contiguous(), "token_ids": self.token_ids.cpu()}

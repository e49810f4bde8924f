"""Residual Prompt Tuning (Razdaibiedina et al., ACL Findings 2023; code: arazd/ResidualPrompts),
the comparison baseline of SuperPos-Prompt.

    p = P + LayerNorm(Up(ReLU(Down(P))))     Down: d -> bottleneck, Up: bottleneck -> d

One MLP shared across prompt tokens (`per_token_mlp=true`: one per token, the paper's "separate"
variant); P starts from sampled vocabulary embeddings. After training the MLP folds away:
`export_prompt` returns the plain prompt p, which reproduces the outputs exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ptlab.errors import ConfigError
from ptlab.methods import register
from ptlab.methods.base import PromptContext, SharedPromptMethod, seeded_init
from ptlab.methods.prompt_tuning import PromptTuningConfig, initial_prompt


@dataclass
class ResidualConfig(PromptTuningConfig):
    name: str = "residual"
    prompt_length: int = 10
    init_vocab_top: Optional[int] = None  # the official code samples from the whole vocabulary
    bottleneck: int = 800
    per_token_mlp: bool = False
    layer_norm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bottleneck < 1:
            raise ConfigError(f"method.bottleneck={self.bottleneck} must be >= 1")


def residual_mlp(hidden: int, bottleneck: int, layer_norm: bool) -> nn.Sequential:
    layers = [nn.Linear(hidden, bottleneck), nn.ReLU(), nn.Linear(bottleneck, hidden)]
    return nn.Sequential(*layers, *([nn.LayerNorm(hidden)] if layer_norm else []))


@register("residual", ResidualConfig)
class ResidualPrompt(SharedPromptMethod):
    def __init__(self, config: ResidualConfig, context: PromptContext) -> None:
        super().__init__()
        self.num_tokens = config.prompt_length
        self.prompt_embeds = nn.Parameter(initial_prompt(config, context, config.prompt_length))
        with seeded_init(context.seed):
            count = config.prompt_length if config.per_token_mlp else 1
            self.mlps = nn.ModuleList(
                residual_mlp(context.hidden_size, config.bottleneck, config.layer_norm) for _ in range(count)
            )

    def prompt(self) -> torch.Tensor:
        if len(self.mlps) == 1:
            return self.prompt_embeds + self.mlps[0](self.prompt_embeds)
        return self.prompt_embeds + torch.cat(
            [mlp(row[None]) for mlp, row in zip(self.mlps, self.prompt_embeds)]
        )

    def export_prompt(self):
        """The MLP folded in: a plain `[n, d]` prompt usable by any prompt-tuning code."""
        with torch.no_grad():
            return {"prompt_embeds": self.injected_prompt().detach().cpu().contiguous()}

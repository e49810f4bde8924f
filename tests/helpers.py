"""Build a backbone, a method and tokenized examples from a composed config, without training."""

from __future__ import annotations

from typing import List

import torch

import ptlab
from ptlab.data.examples import Example

from conftest import compose_config

SENTENCES = [
    "a gripping, beautifully shot film",
    "dull",
    "the plot goes nowhere and the jokes fall flat for two long hours",
    "fine",
]


def build(overrides: List[str], seed: int = 0):
    """Config, backbone, task readout and method as `ptlab-train` builds them, without data."""
    pipeline = ptlab.build(compose_config([*overrides, f"seed={seed}"]), splits=())
    return pipeline.config, pipeline.backbone, pipeline.readout, pipeline.method


def examples(backbone, readout, texts: List[str] = SENTENCES) -> List[Example]:
    ids = backbone.tokenize_sources(readout, [f"sst2 sentence: {text}" for text in texts])
    return [Example(source_ids=row, label=i % 2) for i, row in enumerate(ids)]


def seq2seq_logits(model, batch) -> torch.Tensor:
    """A HuggingFace (or PEFT) seq2seq model's teacher-forced logits on a ptlab batch."""
    return model(
        input_ids=batch["source_ids"], attention_mask=batch["source_mask"], labels=batch["target_ids"]
    ).logits


def causal_target_logits(model, batch, prompt_length: int = 0) -> torch.Tensor:
    """A HuggingFace (or PEFT) causal LM's logits at the positions that predict the targets, on a
    batch of equal-length sources (PEFT's causal path takes no padding) after `prompt_length` rows."""
    full = torch.cat([batch["source_ids"], batch["target_ids"]], 1)
    logits = model(input_ids=full, attention_mask=torch.ones_like(full)).logits
    start = prompt_length + batch["source_ids"].shape[1] - 1
    return logits[:, start : start + batch["target_ids"].shape[1]]


def own_dropout(backbone, *methods, seed: int = 0):
    """Around a training pass outside the training loop: each run's frozen-network dropout masks
    from its own generator, as the loop gives them."""
    return backbone.drawing({id(m): torch.Generator().manual_seed(seed + i) for i, m in enumerate(methods)})

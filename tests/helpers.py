"""Build a backbone, a method and tokenized examples from a composed config, without training."""

from __future__ import annotations

from typing import List

import ptlab
from ptlab.data import Example

from conftest import compose_config

SENTENCES = [
    "a gripping, beautifully shot film",
    "dull",
    "the plot goes nowhere and the jokes fall flat for two long hours",
    "fine",
]


def build(overrides: List[str], seed: int = 0):
    """Config, backbone and method as `ptlab-train` builds them, without data."""
    pipeline = ptlab.build(compose_config([*overrides, f"seed={seed}"]), splits=())
    return pipeline.config, pipeline.backbone, pipeline.method


def examples(backbone, texts: List[str] = SENTENCES) -> List[Example]:
    ids = backbone.tokenize_sources([f"sst2 sentence: {text}" for text in texts])
    return [Example(source_ids=row, label=i % 2) for i, row in enumerate(ids)]

"""Build a backbone, a method and tokenized examples from a composed config, without training."""

from __future__ import annotations

from typing import List

from ptlab.backbones import build_backbone
from ptlab.config import to_object
from ptlab.data import Example
from ptlab.methods import build_method

from conftest import compose_config

SENTENCES = [
    "a gripping, beautifully shot film",
    "dull",
    "the plot goes nowhere and the jokes fall flat for two long hours",
    "fine",
]


def build(overrides: List[str], seed: int = 0):
    config = to_object(compose_config(overrides))
    backbone = build_backbone(
        config.backbone, list(config.task.verbalizers), config.data.max_source_length, seed
    )
    method = build_method(config.method, backbone.prompt_context(seed))
    return config, backbone, method


def examples(backbone, texts: List[str] = SENTENCES) -> List[Example]:
    ids = backbone.tokenize_sources([f"sst2 sentence: {text}" for text in texts])
    return [Example(source_ids=row, label=i % 2) for i, row in enumerate(ids)]

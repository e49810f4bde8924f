"""Prediction for evaluation: rank classification (default) or generation + exact match."""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

from ptlab.backbones import Backbone
from ptlab.data import Example, chunks
from ptlab.methods.base import PromptMethod


def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def predict(backbone: Backbone, method: PromptMethod, batch, mode: str, max_new_tokens: int) -> List[int]:
    """Class indices: the best-scoring verbalizer, or the generated text's exact match (-1: none)."""
    if mode == "rank":
        return backbone.score(method, batch).argmax(-1).tolist()
    lookup = {text.strip(): index for index, text in enumerate(backbone.verbalizers)}
    return [lookup.get(text.strip(), -1) for text in backbone.generate(method, batch, max_new_tokens)]


@torch.no_grad()
def map_sorted_batches(
    backbone: Backbone, examples: List[Example], batch_size: int, device: torch.device, autocast, fn: Callable
) -> List:
    """`fn(batch)`'s per-example results for `examples`, in their order: batches of similar
    length waste little on padding, and the results go back in input order."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].source_ids))
    results = [None] * len(examples)
    for indices in chunks(order, batch_size):
        batch = to_device(backbone.collate([examples[i] for i in indices]), device)
        with autocast():
            for i, result in zip(indices, fn(batch)):
                results[i] = result
    return results


def predict_examples(
    backbone: Backbone,
    method: PromptMethod,
    examples: List[Example],
    batch_size: int,
    device: torch.device,
    autocast,
    mode: str = "rank",
    max_new_tokens: int = 8,
) -> List[int]:
    """Predicted class indices for `examples`, in their order; leaves the modules in eval mode."""
    backbone.eval()
    method.eval()
    return map_sorted_batches(
        backbone,
        examples,
        batch_size,
        device,
        autocast,
        lambda batch: predict(backbone, method, batch, mode, max_new_tokens),
    )

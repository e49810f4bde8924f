"""Evaluation: predictions by rank classification (default) or generation + exact match, and a
split's task metrics from them."""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch

from ptlab.config.schema import TaskConfig
from ptlab.data.examples import Example, chunks
from ptlab.data.metrics import compute_metrics
from ptlab.methods.base import PromptMethod
from ptlab.model.backbone import Backbone
from ptlab.model.readout import TaskReadout
from ptlab.training.distributed import World


def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def predict(
    backbone: Backbone, readout: TaskReadout, method: PromptMethod, batch, mode: str, max_new_tokens: int
) -> List[int]:
    """Class indices: the best-scoring verbalizer, or the generated text's exact match (-1: none)."""
    if mode == "rank":
        return backbone.score(readout, method, batch).argmax(-1).tolist()
    lookup = {text.strip(): index for index, text in enumerate(readout.verbalizers)}
    generated = backbone.generate(readout, method, batch, max_new_tokens)
    return [lookup.get(text.strip(), -1) for text in generated]


@torch.no_grad()
def map_sorted_batches(
    backbone: Backbone,
    readout: TaskReadout,
    examples: List[Example],
    batch_size: int,
    device: torch.device,
    autocast,
    fn: Callable,
) -> List:
    """`fn(batch)`'s per-example results for `examples`, in their order: batches of similar
    length waste little on padding, and the results go back in input order."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].source_ids))
    results = [None] * len(examples)
    for indices in chunks(order, batch_size):
        batch = to_device(backbone.collate(readout, [examples[i] for i in indices]), device)
        with autocast():
            for i, result in zip(indices, fn(batch)):
                results[i] = result
    return results


def predict_examples(
    backbone: Backbone,
    readout: TaskReadout,
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
        readout,
        examples,
        batch_size,
        device,
        autocast,
        lambda batch: predict(backbone, readout, method, batch, mode, max_new_tokens),
    )


def split_metrics(
    backbone: Backbone,
    readout: TaskReadout,
    method: PromptMethod,
    examples: List[Example],
    task: TaskConfig,
    world: World,
    batch_size: int,
    device: torch.device,
    autocast,
    mode: str = "rank",
    max_new_tokens: int = 8,
) -> Dict[str, float]:
    """The task's metrics on `examples`, plus the method's own statistics; each rank of a
    distributed run predicts its shard and every rank gets the metrics of all of them."""
    mine = world.shard(list(range(len(examples))))
    preds = predict_examples(
        backbone,
        readout,
        method,
        [examples[i] for i in mine],
        batch_size,
        device,
        autocast,
        mode,
        max_new_tokens,
    )
    by_index = {i: p for shard in world.gather(list(zip(mine, preds))) for i, p in shard}
    metrics = task_metrics(task, [by_index[i] for i in range(len(examples))], examples)
    metrics.update(method.eval_stats())
    return metrics


def task_metrics(task: TaskConfig, preds: List[int], examples: List[Example]) -> Dict[str, float]:
    return compute_metrics(
        list(task.metrics),
        preds,
        [example.label for example in examples],
        list(task.verbalizers),
        groups=[example.group for example in examples],
        target_values=[example.target_value for example in examples],
    )


def baseline_metrics(task: TaskConfig, examples: List[Example]) -> Dict[str, Any]:
    """The floor a trained prompt must beat, in every metric of the task: one constant prediction
    for every example, the most frequent class (classification) or the class nearest the mean
    score (regression: the mean predictor, whose correlations are 0)."""
    values = [example.target_value for example in examples]
    if values and values[0] is not None:
        mean = sum(values) / len(values)
        numbers = [float(verbalizer) for verbalizer in task.verbalizers]
        constant = min(range(len(numbers)), key=lambda index: abs(numbers[index] - mean))
        name = "mean predictor"
    else:
        labels = [example.label for example in examples]
        constant = max(sorted(set(labels)), key=labels.count)
        name = "majority class"
    return {"name": name, **task_metrics(task, [constant] * len(examples), examples)}

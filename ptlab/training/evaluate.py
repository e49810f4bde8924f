"""Evaluation: predictions by rank classification (default) or generation + exact match, and a
split's task metrics from them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Sequence, Tuple

import torch

from ptlab.config.schema import TaskConfig
from ptlab.data.examples import Example, chunks
from ptlab.methods.base import PromptMethod
from ptlab.metrics import compute_metrics
from ptlab.model.backbone import Backbone
from ptlab.model.readout import RunParts, TaskReadout
from ptlab.training.devices import to_device
from ptlab.training.distributed import World

if TYPE_CHECKING:  # a pipeline is built from this module's functions (build.py imports them)
    from ptlab.training.build import Pipeline


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
def map_runs_batches(
    backbone: Backbone,
    runs: Sequence[Tuple[TaskReadout, List[Example]]],
    batch_size: int,
    device: torch.device,
    autocast,
    fn: Callable[[List[int], Dict[str, torch.Tensor]], Sequence],
) -> List[List]:
    """Per run, `fn`'s per-row results for its examples, in their order. Each run's examples go by
    length into batches of `batch_size` rows (little padding), exactly the batches it has alone;
    the i-th batches of all the runs make one pass, run by run (`collate_runs`), so a run's rows are
    padded as alone wherever its packmates evaluate the same examples. `fn(present, batch)` gets
    the indices of the runs the pass holds."""
    per_run = [
        list(chunks(sorted(range(len(examples)), key=lambda i: len(examples[i].source_ids)), batch_size))
        for _, examples in runs
    ]
    results: List[List] = [[None] * len(examples) for _, examples in runs]
    for step in range(max((len(batches) for batches in per_run), default=0)):
        present = [run for run, batches in enumerate(per_run) if step < len(batches)]
        parts = [(runs[run][0], [runs[run][1][i] for i in per_run[run][step]]) for run in present]
        batch = to_device(backbone.collate_runs(parts), device)
        rows = [(run, i) for run in present for i in per_run[run][step]]
        with autocast():
            for (run, i), result in zip(rows, fn(present, batch)):
                results[run][i] = result
    return results


def map_sorted_batches(
    backbone: Backbone,
    readout: TaskReadout,
    examples: List[Example],
    batch_size: int,
    device: torch.device,
    autocast,
    fn: Callable,
) -> List:
    """`fn(batch)`'s per-example results for one run's `examples`, in their order."""
    return map_runs_batches(
        backbone, [(readout, examples)], batch_size, device, autocast, lambda _, batch: fn(batch)
    )[0]


def runs_scores(
    backbone: Backbone, runs: Sequence[Tuple[RunParts, List[Example]]], batch_size: int, device, autocast
) -> List[List[torch.Tensor]]:
    """Each run's `[C]` verbalizer scores for each of its examples, several runs' prompts scored in
    one pass per batch (mixed-prompt inference); leaves the modules in eval mode."""
    backbone.eval()
    for parts, _ in runs:
        parts.method.eval()

    def scores(present: List[int], batch: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        out = backbone.runs_scores([runs[run][0] for run in present], batch).float().cpu()
        owners = [present[index] for index in batch["run"].tolist()]
        return [row[: len(runs[owner][0].readout.choice_ids)] for row, owner in zip(out, owners)]

    return map_runs_batches(
        backbone, [(parts.readout, examples) for parts, examples in runs], batch_size, device, autocast, scores
    )


def runs_split_metrics(
    backbone: Backbone,
    runs: Sequence[Tuple[RunParts, List[Example], TaskConfig]],
    batch_size: int,
    device: torch.device,
    autocast,
) -> List[Dict[str, float]]:
    """Each run's task metrics (and its method's statistics) on its examples, all the runs scored
    together by rank classification (one process: a packed sweep's members due at one step)."""
    scores = runs_scores(backbone, [(parts, examples) for parts, examples, _ in runs], batch_size, device, autocast)
    return [
        {**task_metrics(task, [int(row.argmax()) for row in run_scores], examples),
         "loss": mean_loss(loss_terms(parts.readout, run_scores, examples)), **parts.method.eval_stats()}
        for (parts, examples, task), run_scores in zip(runs, scores)
    ]  # fmt: skip


def loss_terms(readout: TaskReadout, scores: Sequence[torch.Tensor], examples: Sequence[Example]) -> List[Tuple[float, int]]:
    """Each example's target loss (minus its verbalizer's summed log-probability) and its token
    count, so that a split's `loss` is the token mean that training minimises."""
    return [(-float(row[example.label]), max(1, len(readout.choice_ids[example.label])))
            for row, example in zip(scores, examples)]  # fmt: skip


def mean_loss(terms: Sequence[Tuple[float, int]]) -> float:
    return sum(loss for loss, _ in terms) / max(1, sum(count for _, count in terms))


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
    """The task's metrics and target `loss` on `examples`, plus the method's own statistics; each
    rank of a distributed run scores its shard and every rank gets the metrics of all of them.
    Generation (`mode="generate"`) predicts by generating; the loss still comes from the scores."""
    mine = world.shard(list(range(len(examples))))
    shard = [examples[i] for i in mine]
    scores = runs_scores(backbone, [(RunParts(readout, method), shard)], batch_size, device, autocast)[0]
    if mode == "rank":
        preds = [int(row.argmax()) for row in scores]
    else:
        preds = predict_examples(backbone, readout, method, shard, batch_size, device, autocast, mode, max_new_tokens)
    rows = list(zip(mine, preds, loss_terms(readout, scores, shard)))
    by_index = {i: (pred, terms) for part in world.gather(rows) for i, pred, terms in part}
    metrics = task_metrics(task, [by_index[i][0] for i in range(len(examples))], examples)
    metrics["loss"] = mean_loss([terms for _, terms in by_index.values()])
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


def evaluate_together(pipelines: Sequence[Pipeline], split: str) -> List[Dict[str, float]]:
    """Each pipeline's metrics on `split` (pipelines on one shared backbone: a pack's members, or
    several run folders): those that rank are scored together, several runs' rows in one pass per
    batch (the largest of their `trainer.eval_batch`); one that generates, or a pipeline alone, as
    `Pipeline.evaluate`."""
    if len(pipelines) == 1:
        return [pipelines[0].evaluate(split)]
    ranked = [i for i, pipeline in enumerate(pipelines) if pipeline.config.trainer.eval_mode == "rank"]
    metrics = {i: pipeline.evaluate(split) for i, pipeline in enumerate(pipelines) if i not in ranked}
    if ranked:
        first = pipelines[ranked[0]]
        runs = [(RunParts(pipelines[i].readout, pipelines[i].method), pipelines[i].data[split],
                 pipelines[i].config.task) for i in ranked]  # fmt: skip
        batch_size = max(pipelines[i].config.trainer.eval_batch for i in ranked)
        together = runs_split_metrics(first.backbone, runs, batch_size, first.device, first.autocast)
        metrics.update(zip(ranked, together))
    return [metrics[i] for i in range(len(pipelines))]

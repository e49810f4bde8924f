"""Batches of tokenized examples, the rows of one run or of several runs, run by run.

A batch holds `source_ids`/`source_mask` (padded on the family's side), `labels`, the gold
verbalizer's `target_ids` (padded with -100) and `run`, each row's run index: the rows of run 0
first, then run 1's, so each run's rows are one slice (`rows_per_run`).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from ptlab.data.examples import Example
from ptlab.model.readout import TaskReadout

Batch = Dict[str, torch.Tensor]


def pad(sequences: List[List[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(seq) for seq in sequences)
    rows = [
        [value] * (width - len(seq)) + seq if left else seq + [value] * (width - len(seq))
        for seq in sequences
    ]
    return torch.tensor(rows, dtype=torch.long)


def collate_runs(parts: Sequence[Tuple[TaskReadout, List[Example]]], pad_id: int, pad_left: bool) -> Batch:
    """One batch of several runs' examples (each run's readout and examples), run by run."""
    rows = [(readout, example) for readout, examples in parts for example in examples]
    source = [example.source_ids for _, example in rows]
    return {
        "source_ids": pad(source, pad_id, left=pad_left),
        "source_mask": pad([[1] * len(ids) for ids in source], 0, left=pad_left),
        "labels": torch.tensor([example.label for _, example in rows], dtype=torch.long),
        "target_ids": pad([readout.choice_ids[example.label] for readout, example in rows], -100),
        "run": torch.tensor([index for index, (_, examples) in enumerate(parts) for _ in examples], dtype=torch.long),
    }


def row_runs(batch: Batch, count: int) -> torch.Tensor:
    """Each row's run index, `[B]` (all 0 in a batch of one run, which needs no `run` index)."""
    return batch["run"] if count > 1 else torch.zeros_like(batch["source_mask"][:, 0])


def rows_per_run(batch: Batch, count: int) -> List[int]:
    """How many rows of `batch` each of `count` runs has (a batch of one run needs no `run` index)."""
    if count == 1:
        return [len(batch["source_mask"])]
    run = batch["run"]
    if bool((run[1:] < run[:-1]).any()):
        raise ValueError("a batch of several runs holds their rows run by run, as collate_runs makes it")
    return torch.bincount(run, minlength=count).tolist()

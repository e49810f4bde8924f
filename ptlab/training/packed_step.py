"""One optimizer step of several runs over one frozen backbone (a run alone: a step of one).

Each run draws its next `grad_accum` batches from its own stream (this rank's shard of each,
weighted by its share). The runs' rows are collated run by run (`Backbone.collate_runs`), one
forward computes every run's loss over its own rows (`Backbone.run_losses`: the token mean of its
rows, as alone) plus its method's auxiliary loss, and the weighted sum is backpropagated once. The
runs' parameters are disjoint, so each gets exactly the gradient of its own loss; then each stack
of runs (ptlab/training/stacks.py) takes one optimizer step that is each run's own. A run whose method computes its loss in several
passes (`PromptMethod.loss_in_one_pass` false: SMoP's stochastic routing with its consistency
loss) runs its own pass within the step. Every draw is the run's own: its method's from its
streams (`RunParts.draws`), the frozen network's dropout addressed by its `DropoutStream`
(`RunParts.dropout`, ptlab/model/run_dropout.py).
"""

from __future__ import annotations

import functools
import time
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ptlab.data.examples import Example
from ptlab.methods.base import PromptMethod
from ptlab.model.backbone import Backbone
from ptlab.model.dropout_stream import DropoutStream
from ptlab.model.readout import RunParts, TaskReadout
from ptlab.training.evaluate import to_device
from ptlab.training.stacks import stacked
from ptlab.training.trainer import StepTotals, Trainer

Stepping = Tuple[Trainer, Iterator[List[int]]]  # a run and its stream of training batches


def backward_loss(
    method: PromptMethod,
    backbone: Backbone,
    readout: TaskReadout,
    batch: Dict[str, torch.Tensor],
    autocast,
    weight: float = 1.0,
    dropout: Optional[DropoutStream] = None,
) -> float:
    """One batch's training loss, backpropagated scaled by `weight`; returns the unscaled loss.
    A method's own passes (`PromptMethod.training_loss`), shared with the benchmark."""
    with autocast():
        loss = method.training_loss(backbone, readout, batch, dropout)
    (loss if weight == 1.0 else loss * weight).backward()
    return loss.item()


def parts(trainer: Trainer) -> RunParts:
    """What the run's rows bring to a pass: readout, method, and its method's draws."""
    return RunParts(trainer.readout, trainer.method, functools.partial(trainer.randomness.active, trainer.device),
                    trainer.dropout)  # fmt: skip


class Taker(NamedTuple):
    """A run taking part in one micro-batch of the step: its examples there, and their loss's
    weight (its share of the step)."""

    trainer: Trainer
    totals: StepTotals
    examples: List[Example]
    weight: float


def joint_losses(backbone: Backbone, takers: Sequence[Taker], batch: Dict, autocast) -> None:
    """One pass over the runs' rows together; backpropagates the sum of their weighted losses
    (each run's loss over its own rows plus its method's auxiliary loss)."""
    with autocast():
        losses = backbone.run_losses([parts(taker.trainer) for taker in takers], batch)
        extra = [taker.trainer.method.extra_loss() for taker in takers]
        if any(loss is not None for loss in extra):
            losses = losses + torch.stack([losses.new_zeros(()) if e is None else e.to(losses.dtype) for e in extra])
        weights = torch.tensor([taker.weight for taker in takers], dtype=losses.dtype, device=losses.device)
        total = (losses * weights).sum()
    for taker, loss in zip(takers, losses.tolist()):
        taker.totals.loss += loss * taker.weight
    total.backward()


def own_loss(backbone: Backbone, taker: Taker, batch: Dict, autocast) -> None:
    """A run whose loss takes several passes: its own, on the shared backbone."""
    trainer = taker.trainer
    with trainer.randomness.active(trainer.device):
        loss = backward_loss(trainer.method, backbone, trainer.readout, batch, autocast, taker.weight, trainer.dropout)
    taker.totals.loss += loss * taker.weight


def micro_batch(runs: Sequence[Stepping], totals: Sequence[StepTotals], round_: int) -> List[Taker]:
    """The runs that take part in micro-batch `round_` of the step (a run has `grad_accum` of
    them; a rank's shard may be empty), with their examples and their losses' weights."""
    takers = []
    for (trainer, stream), run_totals in zip(runs, totals):
        if round_ < trainer.cfg.grad_accum:
            rows, weight = trainer.next_examples(stream)
            if rows:
                takers.append(Taker(trainer, run_totals, rows, weight))
    return takers


def step(runs: Sequence[Stepping]) -> Tuple[float, List[float]]:
    """One optimizer step of every run (on one backbone); the step's seconds and each run's loss."""
    trainers = [trainer for trainer, _ in runs]
    backbone, autocast, device = trainers[0].backbone, trainers[0].autocast, trainers[0].device
    for trainer in trainers:
        trainer.begin_step()
    backbone.train()
    totals = [StepTotals() for _ in trainers]
    started = time.perf_counter()
    for round_ in range(max(t.cfg.grad_accum for t in trainers)):
        takers = micro_batch(runs, totals, round_)
        for taker in takers:  # FLOPs as alone: on the run's own batch
            taker.totals.add_flops(taker.trainer.batch_flops(taker.examples))
        joint = [taker for taker in takers if taker.trainer.method.loss_in_one_pass]
        if joint:
            batch = backbone.collate_runs([(taker.trainer.readout, taker.examples) for taker in joint])
            joint_losses(backbone, joint, to_device(batch, device), autocast)
        for taker in takers:
            if not taker.trainer.method.loss_in_one_pass:
                batch = to_device(backbone.collate(taker.trainer.readout, taker.examples), device)
                own_loss(backbone, taker, batch, autocast)
    for trainer, run_totals in zip(trainers, totals):
        trainer.reduce(run_totals)
    for stack in stacked(trainers):  # every run's own update, one optimizer step per stack
        stack.step()
    losses = [trainer.count_update(run_totals) for trainer, run_totals in zip(trainers, totals)]
    return time.perf_counter() - started, losses

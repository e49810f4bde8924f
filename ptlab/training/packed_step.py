"""One optimizer step of several runs over one frozen backbone (a run alone: a step of one).

Each run draws its next `grad_accum` batches from its own stream (this rank's shard of each,
weighted by its share). The runs' rows are collated run by run (`Backbone.collate_runs`), one
forward computes every run's loss over its own rows (`Backbone.run_losses`: the token mean of its
rows, as alone) plus its method's auxiliary loss, and the weighted sum is backpropagated once. The
runs' parameters are disjoint, so each gets exactly the gradient of its own loss; then each steps
its own optimizer (`Trainer.apply_gradients`). A run whose method computes its loss in several
passes (`PromptMethod.loss_in_one_pass` false: SMoP's stochastic routing with its consistency
loss) runs its own pass within the step. Every draw is the run's own: its method's from its
streams (`RunParts.draws`), the frozen network's dropout from its dropout generator
(`Backbone.drawing`, ptlab/model/run_dropout.py).
"""

from __future__ import annotations

import functools
import time
from typing import Dict, Iterator, List, Sequence, Tuple

import torch

from ptlab.data.examples import Example
from ptlab.methods.base import PromptMethod
from ptlab.model.backbone import Backbone
from ptlab.model.readout import RunParts, TaskReadout
from ptlab.training.evaluate import to_device
from ptlab.training.trainer import Trainer

Stepping = Tuple[Trainer, Iterator[List[int]]]  # a run and its stream of training batches


def backward_loss(
    method: PromptMethod,
    backbone: Backbone,
    readout: TaskReadout,
    batch: Dict[str, torch.Tensor],
    autocast,
    weight: float = 1.0,
) -> float:
    """One batch's training loss, backpropagated scaled by `weight`; returns the unscaled loss.
    A method's own passes (`PromptMethod.training_loss`), shared with the benchmark."""
    with autocast():
        loss = method.training_loss(backbone, readout, batch)
    (loss if weight == 1.0 else loss * weight).backward()
    return loss.item()


def parts(trainer: Trainer) -> RunParts:
    """What the run's rows bring to a pass: readout, method, and its method's draws."""
    return RunParts(trainer.readout, trainer.method, functools.partial(trainer.randomness.active, trainer.device))


def joint_losses(backbone: Backbone, takers: Sequence[Trainer], batch: Dict, weights: Dict[int, float],
                 totals: Dict[int, torch.Tensor], autocast) -> None:  # fmt: skip
    """One pass over the runs' rows together; backpropagates the sum of their weighted losses."""
    with autocast():
        losses = backbone.run_losses([parts(t) for t in takers], batch)
        total = losses.new_zeros(())
        for trainer, loss in zip(takers, losses):
            extra = trainer.method.extra_loss()
            loss = loss if extra is None else loss + extra
            weight = weights[id(trainer)]
            total = total + (loss if weight == 1.0 else loss * weight)
            totals[id(trainer)][0] += loss.item() * weight
    total.backward()


def own_loss(backbone: Backbone, trainer: Trainer, batch: Dict, weight: float, totals, autocast) -> None:
    """A run whose loss takes several passes: its own, on the shared backbone."""
    with trainer.randomness.active(trainer.device):
        loss = backward_loss(trainer.method, backbone, trainer.readout, batch, autocast, weight)
    totals[id(trainer)][0] += loss * weight


def micro_batch(runs: Sequence[Stepping], round_: int) -> Tuple[List[Trainer], Dict[int, List[Example]], Dict[int, float]]:
    """The runs that take part in micro-batch `round_` of the step (a run has `grad_accum` of
    them; a rank's shard may be empty), their examples and their losses' weights."""
    takers, examples, weights = [], {}, {}
    for trainer, stream in runs:
        if round_ < trainer.cfg.grad_accum:
            rows, weight = trainer.next_examples(stream)
            if rows:
                takers.append(trainer)
                examples[id(trainer)], weights[id(trainer)] = rows, weight
    return takers, examples, weights


def step(runs: Sequence[Stepping]) -> Tuple[float, List[float]]:
    """One optimizer step of every run (on one backbone); the step's seconds and each run's loss."""
    trainers = [trainer for trainer, _ in runs]
    backbone, autocast, device = trainers[0].backbone, trainers[0].autocast, trainers[0].device
    for trainer in trainers:
        trainer.begin_step()
    backbone.train()
    totals = {id(t): torch.zeros(3, dtype=torch.float64) for t in trainers}  # loss, FLOPs, full-model FLOPs
    streams = {key: value for t in trainers for key, value in t.dropout_streams().items()}
    started = time.perf_counter()
    with backbone.frozen_dropout.drawing(streams):  # each run's masks from its own stream
        for round_ in range(max(t.cfg.grad_accum for t in trainers)):
            takers, examples, weights = micro_batch(runs, round_)
            batches = {id(t): backbone.collate(t.readout, examples[id(t)]) for t in takers}
            for trainer in takers:  # FLOPs as alone: on the run's own batch
                totals[id(trainer)][1:] += trainer.batch_flops(batches[id(trainer)])
            joint = [t for t in takers if t.method.loss_in_one_pass]
            if len(joint) == 1:
                joint_losses(backbone, joint, to_device(batches[id(joint[0])], device), weights, totals, autocast)
            elif joint:
                batch = backbone.collate_runs([(t.readout, examples[id(t)]) for t in joint])
                joint_losses(backbone, joint, to_device(batch, device), weights, totals, autocast)
            for trainer in takers:
                if not trainer.method.loss_in_one_pass:
                    batch = to_device(batches[id(trainer)], device)
                    own_loss(backbone, trainer, batch, weights[id(trainer)], totals, autocast)
    losses = [trainer.apply_gradients(totals[id(trainer)]) for trainer in trainers]
    return time.perf_counter() - started, losses

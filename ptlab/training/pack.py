"""A pack: several runs trained together over one frozen backbone, one forward and one backward
pass per step for all of them, each run ending where it would alone.

Each member is a whole `Trainer` (its own optimizer, lr schedule, random streams, step count,
early stopping, checkpoints, tracker); the pack only replaces *how a step's gradients are
computed*. A packed step concatenates each member's next batch (rows run by run,
`Backbone.collate_runs`), computes every member's loss over its own rows (`Backbone.run_losses`:
the token mean of its rows, as alone) plus its method's auxiliary loss, and backpropagates the sum
once. The members' parameters are disjoint, so each gets exactly the gradient of its own loss; then
each steps its own optimizer. A member whose method computes its loss in several passes
(`PromptMethod.loss_in_one_pass` false) runs its own pass on the shared backbone in the same step.
Members due for evaluation at the same step are scored in one pass (`runs_split_metrics`). A member
that finishes, stops early or fails leaves the pack and the others go on. Members on a stage
schedule (FPT) each switch the shared backbone to their stage before a step; they share a pack when
their partial models coincide at every step (`stage_partitions`; the launcher groups them by
`packing.stage_plan`), so every switch in a step sets the same partial model.

Randomness: every draw is the member's own: its method's from its streams (`RunParts.draws`),
the frozen network's dropout from its dropout generator at its own shape (`Backbone.drawing`,
ptlab/model/run_dropout.py), so a member equals its run alone with dropout on or off and resumes
exactly. Time: each member's `train_seconds` counts the packed
steps it took part in (the pack's wall time, shared), so its examples/s is its share of the pack;
its summary's `pack_size` says how many runs trained together (the part it trained in).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ptlab.data.examples import Example
from ptlab.errors import TrainingFault
from ptlab.model.readout import RunParts
from ptlab.training.build import evaluate_together
from ptlab.training.evaluate import to_device
from ptlab.training.memory import reset_peak_memory
from ptlab.training.preemption import PreemptionGuard
from ptlab.training.progress import Progress
from ptlab.training.trainer import LogWindow, Trainer, backward_loss

log = logging.getLogger("ptlab")


@dataclass
class Member:
    """One run of a pack and where its loop stands; `speaking()` routes its log lines to its own
    train.log (ptlab/training/run_folder.py)."""

    trainer: Trainer
    speaking: Callable
    name: str
    stream: Optional[Iterator[List[int]]] = None
    window: LogWindow = field(default_factory=LogWindow)
    progress: Optional[Progress] = None
    stopped_early: bool = False
    loss: float = 0.0  # of its last step
    seen: int = 0  # examples seen at its last log-window count
    stage_plan: Optional[Dict] = None  # its job's `packing.stage_plan` (FPT): equal plans, equal scores

    @property
    def done(self) -> bool:
        return self.stopped_early or self.trainer.state.step >= self.trainer.total_steps

    def parts(self, device: torch.device) -> RunParts:
        trainer = self.trainer
        return RunParts(trainer.readout, trainer.method, functools.partial(trainer.randomness.active, device))

    def next_examples(self) -> List[Example]:
        """The member's next global batch (one of its `grad_accum` per step)."""
        indices = next(self.stream)
        self.trainer.state.examples_seen += len(indices)
        return [self.trainer.data["train"][i] for i in indices]


class PackOutOfMemory(TrainingFault):
    """A packed step ran out of memory: the pack is too large for the device."""


def out_of_memory_error(error: Exception) -> Optional[Exception]:
    """`error` when it is the device running out of memory (CUDA's, or the CPU allocator's words)."""
    if isinstance(error, torch.OutOfMemoryError):
        return error
    message = str(error)
    return error if "can't allocate memory" in message or "not enough memory" in message else None


class Pack:
    """Trains `members` (Trainers over one backbone, already resumed) together until each is done;
    `finished(member, summary)` and `failed(member, error)` are told as each one leaves."""

    def __init__(
        self,
        members: List[Member],
        finished: Callable[[Member, Dict], None],
        failed: Callable[[Member, Exception], None],
    ) -> None:
        self.members = members
        self.size = len(members)  # the runs training together now: a finished member's pack_size
        self.finished, self.failed = finished, failed
        first = members[0].trainer
        self.backbone, self.device, self.autocast = first.backbone, first.device, first.autocast

    # --- one packed step ---------------------------------------------------------------------
    def joint_losses(self, members: List[Member], examples: Dict[int, List[Example]], totals) -> None:
        """One pass over the members' rows together; backpropagates the sum of their losses, each
        weighted as its trainer weights a micro-batch."""
        batch = to_device(
            self.backbone.collate_runs([(m.trainer.readout, examples[id(m)]) for m in members]), self.device
        )
        with self.autocast():
            losses = self.backbone.run_losses([m.parts(self.device) for m in members], batch)
            total = losses.new_zeros(())
            for member, loss in zip(members, losses):
                extra = member.trainer.method.extra_loss()
                loss = loss if extra is None else loss + extra
                weight = 1.0 / member.trainer.cfg.grad_accum
                total = total + (loss if weight == 1.0 else loss * weight)
                totals[id(member)][0] += loss.item() * weight
        total.backward()

    def own_loss(self, member: Member, examples: List[Example], totals) -> None:
        """A member whose loss takes several passes: its own, on the shared backbone."""
        trainer = member.trainer
        batch = to_device(self.backbone.collate(trainer.readout, examples), self.device)
        weight = 1.0 / trainer.cfg.grad_accum
        with trainer.randomness.active(self.device):
            loss = backward_loss(trainer.method, self.backbone, trainer.readout, batch, self.autocast, weight)
        totals[id(member)][0] += loss * weight

    def step(self, members: List[Member]) -> float:
        """One optimizer step of every member; returns the step's seconds."""
        for member in members:
            member.trainer.enter_stage()
            member.trainer.optimizer.zero_grad(set_to_none=True)
            member.trainer.method.train()
        self.backbone.train()
        totals = {id(m): torch.zeros(3, dtype=torch.float64) for m in members}
        started = time.perf_counter()
        streams = {key: value for m in members for key, value in m.trainer.dropout_streams().items()}
        with self.backbone.drawing(streams):  # each member's masks from its own stream
            for round_ in range(max(m.trainer.cfg.grad_accum for m in members)):
                takers = [m for m in members if round_ < m.trainer.cfg.grad_accum]
                examples = {id(m): m.next_examples() for m in takers}
                for member in takers:  # FLOPs as alone: on the member's own batch
                    batch = member.trainer.backbone.collate(member.trainer.readout, examples[id(member)])
                    totals[id(member)][1:] += member.trainer.batch_flops(batch)
                joint = [m for m in takers if m.trainer.method.loss_in_one_pass]
                if joint:
                    self.joint_losses(joint, examples, totals)
                for member in takers:
                    if not member.trainer.method.loss_in_one_pass:
                        self.own_loss(member, examples[id(member)], totals)
        for member in members:
            member.loss = member.trainer.apply_gradients(totals[id(member)])
        return time.perf_counter() - started

    # --- evaluation ----------------------------------------------------------------------------
    def evaluate(self, due: List[Member]) -> Dict[int, Dict[str, float]]:
        """Validation metrics of the members due at this step, scored together (`evaluate_together`)."""
        metrics = evaluate_together([member.trainer.pipeline for member in due], "validation")
        return {id(member): values for member, values in zip(due, metrics)}

    # --- the loop ----------------------------------------------------------------------------
    def leave(self, member: Member, error: Optional[Exception] = None) -> None:
        """`member` leaves the pack: finished (its test split scored, its summary made) or failed."""
        self.members.remove(member)
        if member.progress is not None:
            member.progress.close()
        with member.speaking():
            if error is not None:
                self.failed(member, error)
                return
            try:  # its test split, its summary, its W&B run: a fault here is its own
                summary = member.trainer.finish_fit(member.stopped_early)
                summary["pack_size"] = self.size
                self.finished(member, summary)
            except Exception as failure:  # noqa: BLE001 - whatever it is, it ends this member only
                self.failed(member, failure)

    def save_all(self) -> None:
        for member in self.members:
            with member.speaking():
                member.trainer.save_last()

    def run(self) -> None:
        reset_peak_memory(self.device)  # each member's peak_memory_mb: the pack's training
        for member in list(self.members):
            with member.speaking():
                trainer = member.trainer
                member.stream = trainer.start_fit(self.known_scores(member))
                member.seen = trainer.state.examples_seen
                member.progress = Progress(
                    trainer.total_steps, trainer.state.step, True, trainer.task.main_metric, trainer.baseline,
                    interactive=False, label=member.name,
                )  # fmt: skip
            if member.done:
                self.leave(member)
        parts = stage_partitions(self.members)
        if len(parts) > 1:
            log.info("pack: %s", "; then ".join(",".join(m.name for m in part) for part in parts)
                     + " (their partial models differ: another step, or other neuron scores)")  # fmt: skip
        with PreemptionGuard() as guard:
            for index, part in enumerate(parts):
                self.members, self.size = part, len(part)
                try:
                    self.train(guard)
                except PackOutOfMemory as fault:  # the members still waiting fail with the same line
                    self.members = [m for later in parts[index + 1 :] for m in later]
                    for waiting in list(self.members):
                        self.leave(waiting, fault)
                    return
                finally:
                    restore_full_model(part)

    def known_scores(self, member: Member) -> Optional[List[torch.Tensor]]:
        """FFN neuron scores a packmate started before `member` ranked from the same inputs (an FPT
        lr grid scores once, not once per member)."""
        if member.stage_plan is None:
            return None
        for other in self.members:
            if other is member:
                return None
            partial = other.trainer.stage_schedule.partial
            if other.stage_plan == member.stage_plan and partial.scores is not None:
                return partial.scores
        return None

    def train(self, guard: PreemptionGuard) -> None:
        """Rounds until every member of `self.members` has left."""
        while self.members:
            try:
                self.round()
            except (torch.OutOfMemoryError, RuntimeError) as error:  # a step's or an evaluation's
                if out_of_memory_error(error) is None:
                    raise
                raise self.out_of_memory(error) from None
            steps = [m.trainer.state.step for m in self.members]
            guard.stop_if_signalled(self.save_all, min(steps) if steps else 0)

    def round(self) -> None:
        """One packed step, the evaluations due after it, and the members that are done leave."""
        active = list(self.members)
        elapsed = self.step(active)
        for member in active:
            self.after_step(member, elapsed)
        due = [m for m in active if m in self.members and m.trainer.eval_due()]
        if due:
            metrics = self.evaluate(due)
            for member in due:
                with member.speaking():
                    try:  # its metrics, best prompt and checkpoint: a fault here is its own
                        member.stopped_early = member.trainer.record_eval(metrics[id(member)])
                    except Exception as error:  # noqa: BLE001 - it ends this member only
                        self.leave(member, error)
                        continue
                    state = member.trainer.state
                    member.progress.evaluated(
                        state.step, state.last_metrics, state.best_score, state.best_step
                    )
        for member in [m for m in active if m in self.members and m.done]:
            self.leave(member)

    def after_step(self, member: Member, elapsed: float) -> None:
        """A member's bookkeeping after a packed step: seconds, loss check, log line."""
        trainer = member.trainer
        with member.speaking():
            try:  # its loss check and its log line (metrics.jsonl, W&B): a fault here is its own
                trainer.count_step(
                    member.loss, elapsed, trainer.state.examples_seen - member.seen, member.window
                )
                member.seen = trainer.state.examples_seen
                member.progress.advance()
                member.window = trainer.log_if_due(member.window, member.progress)
            except Exception as error:  # noqa: BLE001 - it ends this member only
                self.leave(member, error)

    def out_of_memory(self, error: Exception) -> PackOutOfMemory:
        """The pack does not fit: every member fails with the same line, its last checkpoint kept."""
        size = len(self.members)
        first = str(error).strip().splitlines()[0][:160]
        fault = PackOutOfMemory(
            f"a pack of {size} runs ran out of memory in a training step ({first}): set "
            f"hydra.launcher.pack_size={max(1, size // 2)} (or lower) and run the sweep command again; "
            "each run resumes from its last checkpoint"
        )
        for member in list(self.members):
            self.leave(member, fault)
        return fault


def partial_model_key(member: Member) -> Optional[Tuple]:
    """What a member's partial models depend on from where it stands: its step, its stages and
    their ends, its neuron scores (None: no stage schedule, the full model throughout)."""
    schedule = member.trainer.stage_schedule
    if schedule.partial is None:
        return None
    stages = tuple((stage.depth, stage.width) for stage in schedule.cfg.stages)
    return member.trainer.state.step, stages, tuple(schedule.stage_ends), schedule.cfg.with_decoder


def same_scores(a: Optional[List[torch.Tensor]], b: Optional[List[torch.Tensor]]) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def stage_partitions(members: List[Member]) -> List[List[Member]]:
    """The members in parts that train one after another: the members of a part shrink and grow
    the shared backbone identically at every step. The launcher packs only staged jobs with one
    stage plan (`packing.stage_plan`); members resumed at other steps, or whose neuron scores
    differ after all, train after the others rather than on the wrong model."""
    parts: List[Tuple[Optional[Tuple], Optional[List[torch.Tensor]], List[Member]]] = []
    for member in members:
        key, partial = partial_model_key(member), member.trainer.stage_schedule.partial
        scores = None if partial is None else partial.scores
        for part_key, part_scores, part in parts:
            if part_key == key and same_scores(part_scores, scores):
                part.append(member)
                break
        else:
            parts.append((key, scores, [member]))
    return [part for _, _, part in parts]


def restore_full_model(members: List[Member]) -> None:
    """The shared backbone back in its full form once staged members are done with it."""
    for member in members:
        if member.trainer.stage_schedule.partial is not None:
            member.trainer.stage_schedule.partial.restore()
            return

"""The training loop: a pack of runs over one frozen backbone, each run ending where it would
alone (a run alone is a pack of one: there is no other loop).

Each member is a whole `Trainer` (its own optimizer, lr schedule, random streams, step count,
early stopping, checkpoints, tracker); the pack drives them: one step for all of them
(ptlab/training/packed_step.py: one forward and one backward pass over their rows together), the
log lines, the evaluations due after it (scored together, `evaluate_together`), checkpoints,
signals. A member that finishes, stops early or fails leaves the pack and the others go on. A
fault in one member's own work (its loss check, log line, evaluation record, checkpoint, test
split, summary) ends that member alone; one the pack cannot pin to a member (inside the joint
pass, or running out of memory) stops the pack with `PackFault`, and its members are trained
again in parts from their checkpoints (ptlab/training/train_runs.py). Members on a stage schedule
(FPT) each switch the shared backbone to their stage before a step; they share a pack when their
partial models coincide at every step (`stage_partitions`; the launcher groups them by
`packing.stage_plan`), so every switch in a step sets the same partial model.

Randomness: every draw is the member's own: its method's from its streams (`RunParts.draws`),
the frozen network's dropout addressed by its run, step, pass, row and position
(ptlab/model/run_dropout.py), so a member equals its run alone with dropout on or off and resumes
exactly. Time: each member's `train_seconds` counts the packed steps it took part in (the pack's
wall time, shared), so its examples/s is its share of the pack; its summary's `pack_size` says how
many runs trained together (the part it trained in).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ptlab.training import packed_step
from ptlab.training.build import evaluate_together
from ptlab.training.memory import reset_peak_memory
from ptlab.training.preemption import PreemptionGuard
from ptlab.training.progress import Progress
from ptlab.training.stacks import Stacks
from ptlab.training.trainer import LogWindow, Trainer

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

    def stepping(self) -> Tuple[Trainer, Iterator[List[int]]]:
        return self.trainer, self.stream


class PackFault(Exception):
    """An error the pack cannot pin to one member (raised inside the joint pass or its joint
    evaluation), or the device running out of memory: its `members` (all still in memory, and so
    not trustworthy) are to be trained again from their checkpoints, in parts."""

    def __init__(self, members: List[Member], error: Exception, out_of_memory: bool) -> None:
        super().__init__(str(error))
        self.members, self.error, self.out_of_memory = members, error, out_of_memory


def out_of_memory_error(error: Exception) -> Optional[Exception]:
    """`error` when it is the device running out of memory (CUDA's, or the CPU allocator's words)."""
    if isinstance(error, torch.OutOfMemoryError):
        return error
    message = str(error)
    return error if "can't allocate memory" in message or "not enough memory" in message else None


class Pack:
    """Trains `members` (Trainers over one backbone, already resumed) together until each is done;
    `finished(member, summary)` and `failed(member, error)` are told as each one leaves. `alone`:
    the pack is a run alone in its process (its progress is a bar on a terminal, as any run's)."""

    def __init__(
        self,
        members: List[Member],
        finished: Callable[[Member, Dict], None],
        failed: Callable[[Member, Exception], None],
        alone: bool = False,
    ) -> None:
        self.members = members
        self.size = len(members)  # the runs training together now: a finished member's pack_size
        self.finished, self.failed, self.alone = finished, failed, alone
        self.device = members[0].trainer.device
        self.stacks: Optional[Stacks] = None  # the training members' stacks (ptlab/training/stacks.py)

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        reset_peak_memory(self.device)  # each member's peak_memory_mb: the pack's training
        for member in list(self.members):
            self.start(member)
        parts = stage_partitions(self.members)
        if len(parts) > 1:
            log.info("pack: %s", "; then ".join(",".join(m.name for m in part) for part in parts)
                     + " (their partial models differ: another step, or other neuron scores)")  # fmt: skip
        with PreemptionGuard() as guard:
            for index, part in enumerate(parts):
                self.members, self.size = part, len(part)
                try:
                    self.train(guard)
                except PackFault as fault:  # the members still waiting go with it
                    fault.members += [m for later in parts[index + 1 :] for m in later]
                    raise
                finally:
                    restore_full_model(part)

    def start(self, member: Member) -> None:
        """A member's stream from where it stands, its progress, and its leaving if it is done."""
        with member.speaking():
            trainer = member.trainer
            member.stream = trainer.start_fit(self.known_scores(member))
            member.seen = trainer.state.examples_seen
            enabled = trainer.world.is_main
            member.progress = Progress(
                trainer.total_steps, trainer.state.step, enabled, trainer.task.main_metric, trainer.baseline,
                interactive=None if self.alone else False, label="" if self.alone else member.name,
            )  # fmt: skip
        if member.done:
            self.leave(member)

    def train(self, guard: PreemptionGuard) -> None:
        """Rounds until every member of `self.members` has left."""
        self.stacks = Stacks([member.trainer for member in self.members])
        while self.members:
            try:
                self.round()
            except Exception as error:  # noqa: BLE001 - the joint pass's or the joint evaluation's
                self.unpinned(error)
            steps = [m.trainer.state.step for m in self.members]
            guard.stop_if_signalled(self.save_all, min(steps) if steps else 0)

    def unpinned(self, error: Exception) -> None:
        """An error of the pack's joint work: a member alone fails with it (out of memory: with
        the sizes to lower); several go back to their checkpoints, to be trained in parts."""
        out_of_memory = out_of_memory_error(error) is not None
        if len(self.members) > 1:
            raise PackFault(list(self.members), error, out_of_memory) from error
        member = self.members[0]
        self.leave(member, member.trainer.out_of_memory(error) if out_of_memory else error)

    def round(self) -> None:
        """One packed step, the evaluations due after it, and the members that are done leave."""
        active = list(self.members)
        elapsed, losses = packed_step.step([member.stepping() for member in active])
        for member, loss in zip(active, losses):
            member.loss = loss
            self.after_step(member, elapsed)
        due = [m for m in active if m in self.members and m.trainer.eval_due()]
        if due:
            metrics = evaluate_together([member.trainer.pipeline for member in due], "validation")
            for member, values in zip(due, metrics):
                self.record(member, values)
        for member in [m for m in active if m in self.members and m.done]:
            self.leave(member)

    # --- one member's own work: a fault in it ends that member alone ---------------------------
    def after_step(self, member: Member, elapsed: float) -> None:
        """A member's bookkeeping after a packed step: seconds, loss check, log line."""
        trainer = member.trainer
        with member.speaking():
            try:
                trainer.count_step(
                    member.loss, elapsed, trainer.state.examples_seen - member.seen, member.window
                )
                member.seen = trainer.state.examples_seen
                member.progress.advance()
                member.window = trainer.log_if_due(member.window, member.progress)
            except Exception as error:  # noqa: BLE001 - it ends this member only
                self.leave(member, error)

    def record(self, member: Member, metrics: Dict[str, float]) -> None:
        """A member's validation result: logged, its best prompt kept, its checkpoint written."""
        with member.speaking():
            try:
                member.stopped_early = member.trainer.record_eval(metrics)
            except Exception as error:  # noqa: BLE001 - it ends this member only
                self.leave(member, error)
                return
            state = member.trainer.state
            member.progress.evaluated(state.step, state.last_metrics, state.best_score, state.best_step)

    def leave(self, member: Member, error: Optional[Exception] = None) -> None:
        """`member` leaves the pack: finished (its test split scored, its summary made) or failed."""
        self.members.remove(member)
        if self.stacks is not None:  # its slices and optimizer state become its own again
            self.stacks.leave(member.trainer)
        if member.progress is not None:
            member.progress.close()
        with member.speaking():
            if error is not None:
                self.failed(member, error)
                return
            try:  # its test split, its summary, its W&B run
                summary = member.trainer.finish_fit(member.stopped_early)
                summary["pack_size"] = self.size
                self.finished(member, summary)
            except Exception as failure:  # noqa: BLE001 - it ends this member only
                self.failed(member, failure)

    def save_all(self) -> None:
        for member in self.members:
            with member.speaking():
                member.trainer.save_last()

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

"""The training loop, the only one: runs trained together over one frozen backbone, from each
batch to each optimizer step. A run alone is a pack of one, on the same path.

`train_runs` opens runs (ptlab/training/opened_run.py: built on the shared backbone, resumed,
recorded) into a `Pack` of a number of slots; a run leaves as it ends (finished, failed, or at a
successive-halving rung) and the next queued job joins in its place (`Pack.refill`). A `step`:
- every run draws its `grad_accum` batches from its own stream (this rank's shard of each,
  weighted by its share of the step);
- the rows of all runs are collated together (`Backbone.collate_runs`), one forward computes
  each run's loss over its own rows (`Backbone.run_losses`: the token mean, as alone) plus its
  method's auxiliary loss, and their weighted sum is backpropagated once; the runs' parameters
  are disjoint, so each gets exactly the gradient of its own loss (a method whose loss takes
  several passes, `loss_in_one_pass` false, runs its own pass within the step);
- each stack of runs (ptlab/training/stacks.py) takes one optimizer step that is every member's own.
Every draw is the run's own, so a member equals its run alone and resumes exactly.

Failures (`OnFailure`): a fault in one run's own work (opening it, its loss check, log line,
evaluation record, checkpoint, test split, summary) ends that run alone: a run alone raises it, a
sweep's member records it and the others go on. A fault the pack cannot pin to one run (the joint
pass or evaluation) stops the pack (`PackFault`): its runs train again from their checkpoints in
parts, halved after running out of memory, one by one after another error; then its queue.

Staged runs (FPT) train together only while their partial models coincide (`stage_partitions`).
A member's `train_seconds` counts the pack's steps it took part in; `pack_size`, its packmates.
"""

from __future__ import annotations

import enum
import functools
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ptlab.data.examples import Example
from ptlab.methods.base import PromptMethod
from ptlab.model.backbone import Backbone
from ptlab.model.dropout_stream import DropoutStream
from ptlab.model.readout import RunParts, TaskReadout
from ptlab.training.build import SharedBackbone
from ptlab.training.devices import to_device
from ptlab.training.distributed import World
from ptlab.training.evaluate import evaluate_together
from ptlab.training.memory import out_of_memory_error, reset_peak_memory
from ptlab.training.opened_run import Job, OpenRun, close_run, open_run, record_failed
from ptlab.training.preemption import PreemptionGuard
from ptlab.training.progress import Progress
from ptlab.training.run_folder import RunLog
from ptlab.training.stacks import Stacks, stacked
from ptlab.training.stages import known_scores, restore_full_model, stage_partitions
from ptlab.training.trainer import LogWindow, StepTotals, Trainer, run_summary

log = logging.getLogger("ptlab")


# --- runs and how their failures travel ------------------------------------------------------------
class OnFailure(enum.Enum):
    """What a run's failure does: `RAISE` (a run alone: its command ends with it, once the others
    are done), `RECORD` (a sweep's member: failure.json and one line on stderr; the others go on)."""

    RAISE = "raise"
    RECORD = "record"


Ended = Callable[[int, Optional[float]], None]  # a job's index and best validation value (None: failed)


def unheard(index: int, value: Optional[float]) -> None:
    """Nobody is told when a job ends (a run alone; a pack whose launcher reads the results)."""


@dataclass(eq=False)
class Run:
    """One opened run in the loop (its job's `index` in the group) and where its loop stands;
    `log.speaking()` routes its log lines to its own train.log (ptlab/training/run_folder.py)."""

    index: int
    job: Job
    opened: OpenRun
    log: RunLog
    stream: Optional[Iterator[List[int]]] = None
    window: LogWindow = field(default_factory=LogWindow)
    progress: Optional[Progress] = None
    stopped_early: bool = False
    loss: float = 0.0  # of its last step
    seen: int = 0  # examples seen at its last log-window count

    @property
    def trainer(self) -> Trainer:
        return self.opened.trainer

    @property
    def name(self) -> str:
        return self.opened.run_dir.name

    @property
    def done(self) -> bool:
        return self.stopped_early or self.trainer.state.step >= self.trainer.end_step

    @property
    def at_rung(self) -> bool:
        """It has trained to the successive-halving rung it stops at, short of its end."""
        return not self.stopped_early and self.trainer.end_step == self.trainer.state.step < self.trainer.total_steps


@dataclass
class Outcomes:
    """Where the runs' ends go: their results by job index, `ended`, and their failures by
    `on_failure` (`raised`: a run alone's, raised once its pack is done)."""

    on_failure: OnFailure
    results: List[Optional[float]]
    ended: Ended
    raised: List[Exception] = field(default_factory=list)


class PackFault(Exception):
    """An error the pack cannot pin to one run (inside the joint pass or its joint evaluation, or
    the device out of memory): its `runs` (all still in memory, and so not trustworthy) are to be
    trained again from their checkpoints, in parts."""

    def __init__(self, runs: List[Run], error: Exception, out_of_memory: bool) -> None:
        super().__init__(str(error))
        self.runs, self.error, self.out_of_memory = runs, error, out_of_memory
        self.queue: List[int] = []  # the pack's jobs that had not joined it yet


# --- the jobs, in packs that halve when they do not fit ----------------------------------------------
def train_runs(
    jobs: Sequence[Job], folders: Sequence[Path], shared: Optional[SharedBackbone], world: World,
    on_failure: OnFailure = OnFailure.RECORD, ended: Ended = unheard, slots: Optional[int] = None,
) -> List[Optional[float]]:  # fmt: skip
    """Train the jobs, in their prepared run `folders`, as one pack on `shared` (None: a run alone
    builds its own backbone) of `slots` runs at once (None: all), the next job joining as a member
    leaves; each one's best validation value (at a rung: its value there), None for a run that
    failed; `ended` is told as each one ends."""
    results: List[Optional[float]] = [None] * len(jobs)
    parts = [(list(range(len(jobs))), slots or len(jobs))]
    while parts:
        part, size = parts.pop(0)
        try:
            train_part(jobs, folders, part, size, shared, world, Outcomes(on_failure, results, ended))
        except PackFault as fault:
            faulted = {run.index for run in fault.runs}
            todo = [index for index in part if index in faulted]
            smaller = max(1, min(size, len(todo)) // 2) if fault.out_of_memory else 1
            log.warning("a pack of %d runs %s (%s): its members train again from their last checkpoints, "
                        "in packs of %d", len(todo), "ran out of memory" if fault.out_of_memory else "failed",
                        str(fault.error).strip().splitlines()[0][:160], smaller)  # fmt: skip
            later = [(fault.queue, smaller if fault.out_of_memory else size)] if fault.queue else []
            parts[:0] = [(todo[i : i + smaller], smaller) for i in range(0, len(todo), smaller)] + later
    return results


def train_part(
    jobs: Sequence[Job], folders: Sequence[Path], part: List[int], slots: int, shared: Optional[SharedBackbone],
    world: World, outcome: Outcomes,
) -> None:  # fmt: skip
    """The jobs `part` (indices) trained as one pack of `slots` runs at once, the rest queued to
    join as members leave; each one's outcome told."""
    with ExitStack() as stack:

        def opened(index: int) -> Optional[Run]:
            """Job `index` opened into a `Run` (its failure to open recorded: None)."""
            job, folder = jobs[index], folders[index]
            run_log = stack.enter_context(RunLog())
            with run_log.speaking():
                try:
                    run = open_run(folder, job.config, job.cfg, world, job.facts, run_log, shared)
                except Exception as error:  # noqa: BLE001 - a fault in building or resuming it is its own
                    if outcome.on_failure is OnFailure.RAISE:
                        raise
                    record_failed(folder, error)
                    outcome.ended(index, None)
                    return None
            run.trainer.stop_at = job.rung.step if job.rung else None
            stack.callback(run.tracker.finish)  # also when the pack stops (a signal, a bug)
            return Run(index, job, run, run_log)

        queue, runs = list(part), []
        while queue and len(runs) < slots:
            run = opened(queue.pop(0))
            runs += [run] if run is not None else []
        if len(runs) > 1:
            log.info("pack of %d runs on %s: training together%s", len(runs), runs[0].job.config.backbone.name,
                     f", {len(queue)} more joining as slots free" if queue else "")  # fmt: skip
        if runs:
            Pack(runs, outcome, queue, opened).run()
        if outcome.raised:
            raise outcome.raised[0]


# --- the pack ----------------------------------------------------------------------------------------
class Pack:
    """Trains `runs` (opened over one backbone, already resumed) together until each is done; each
    one's outcome goes to `outcome` as it leaves."""

    def __init__(self, runs: List[Run], outcome: Outcomes, queue: Optional[List[int]] = None,
                 opened: Optional[Callable[[int], Optional[Run]]] = None) -> None:  # fmt: skip
        self.runs, self.outcome = runs, outcome
        self.size = len(runs)  # the runs training together now: a finished run's pack_size
        self.slots = len(runs)  # the pack stays this full while its queue lasts
        self.queue, self.opened = queue or [], opened  # jobs (indices) to join as members leave
        self.stacks: Optional[Stacks] = None  # the training runs' stacks (ptlab/training/stacks.py)

    def run(self) -> None:
        reset_peak_memory(self.runs[0].trainer.device)  # each run's peak_memory_mb: the pack's training
        alone = len(self.runs) == 1
        for run in list(self.runs):
            self.start(run, alone)
        parts = stage_partitions([(run.trainer.stage_schedule, run.trainer.state.step) for run in self.runs])
        if len(parts) > 1:
            log.info("pack: %s", "; then ".join(",".join(self.runs[i].name for i in part) for part in parts)
                     + " (their partial models differ: another step, or other neuron scores)")  # fmt: skip
        parts = [[self.runs[i] for i in part] for part in parts]
        with PreemptionGuard() as guard:
            for index, part in enumerate(parts):
                self.runs, self.size = part, len(part)
                try:
                    self.train(guard)
                except PackFault as fault:  # the runs still waiting go with it, and its queue
                    fault.runs += [run for later in parts[index + 1 :] for run in later]
                    fault.queue, self.queue = self.queue, []
                    raise
                finally:
                    restore_full_model(run.trainer.stage_schedule for run in part)

    def start(self, run: Run, alone: bool) -> None:
        """A run's stream from where it stands, its progress (a bar on a terminal for a run alone,
        named lines for a pack's), and its leaving if it is done."""
        with run.log.speaking():
            trainer = run.trainer
            earlier = [(other.job.config, other.trainer.stage_schedule) for other in self.runs[: self.runs.index(run)]]
            run.stream = trainer.start_fit(known_scores(run.job.config, earlier))
            run.seen = trainer.state.examples_seen
            run.progress = Progress(trainer.total_steps, trainer.state.step, trainer.world.is_main, trainer.task.main_metric,
                                    trainer.baseline, interactive=None if alone else False, label="" if alone else run.name)  # fmt: skip
        if run.done:
            self.leave(run)

    def train(self, guard: PreemptionGuard) -> None:
        """Rounds until every run of `self.runs` has left."""
        self.stacks = Stacks([run.trainer for run in self.runs])
        while self.runs:
            try:
                self.round()
            except Exception as error:  # noqa: BLE001 - the joint pass's or the joint evaluation's
                out_of_memory = out_of_memory_error(error)
                if len(self.runs) > 1:
                    raise PackFault(list(self.runs), error, out_of_memory) from error
                self.leave(self.runs[0], self.runs[0].trainer.out_of_memory(error) if out_of_memory else error)
            steps = [run.trainer.state.step for run in self.runs]
            guard.stop_if_signalled(self.save_all, min(steps) if steps else 0)

    def round(self) -> None:
        """One step of every run, the evaluations due after it, and the runs that are done leave."""
        active = list(self.runs)
        elapsed, losses = step([(run.trainer, run.stream) for run in active])
        for run, loss in zip(active, losses):
            run.loss = loss
            self.after_step(run, elapsed)
        due = [run for run in active if run in self.runs and run.trainer.eval_due()]
        if due:
            metrics = evaluate_together([run.trainer.pipeline for run in due], "validation")
            for run, values in zip(due, metrics):
                self.record(run, values)
        for run in [run for run in active if run in self.runs and run.done]:
            self.leave(run)

    # --- one run's own work: a fault in it ends that run alone ----------------------------------------
    def after_step(self, run: Run, elapsed: float) -> None:
        """A run's bookkeeping after a step: seconds, loss check, progress, log line."""
        trainer = run.trainer
        with run.log.speaking():
            try:
                trainer.count_step(run.loss, elapsed, trainer.state.examples_seen - run.seen, run.window)
                run.seen = trainer.state.examples_seen
                run.progress.advance()
                logged = trainer.log_if_due(run.window)
                if logged is not None:
                    run.window = LogWindow()
                    run.progress.trained(trainer.state.step, logged)
            except Exception as error:  # noqa: BLE001 - it ends this run only
                self.leave(run, error)

    def record(self, run: Run, metrics: Dict[str, float]) -> None:
        """A run's validation result: logged, its best prompt kept, its checkpoint written."""
        with run.log.speaking():
            try:
                run.stopped_early = run.trainer.record_eval(metrics)
            except Exception as error:  # noqa: BLE001 - it ends this run only
                self.leave(run, error)
                return
            state = run.trainer.state
            run.progress.evaluated(state.step, state.last_metrics, state.best_score, state.best_step)

    def leave(self, run: Run, error: Optional[Exception] = None) -> None:
        """`run` leaves the pack: finished (its test split scored, its summary recorded), stopped at
    its rung (its summary recorded), or failed."""
        self.runs.remove(run)
        if self.stacks is not None:  # its slices and optimizer state become its own again
            self.stacks.leave(run.trainer)
        if run.progress is not None:
            run.progress.close()
        with run.log.speaking():
            if error is None:
                try:  # its test split (not at a rung), its summary, its W&B run
                    rung = run.job.rung if run.at_rung else None
                    summary = run_summary(run.trainer, False, None) if rung else run.trainer.finish_fit(run.stopped_early)
                    summary["pack_size"] = self.size
                    self.outcome.results[run.index] = close_run(run.opened, summary, rung)
                    run.opened.tracker.finish()
                    self.outcome.ended(run.index, self.outcome.results[run.index])
                except Exception as failure:  # noqa: BLE001 - it ends this run only
                    error = failure
            if error is not None:
                self.fail(run, error)
        self.refill()

    def refill(self) -> None:
        """Queued jobs join while the pack has free slots: opened on the loaded backbone (resumed
        from their checkpoints), started, and stacked with the members of their method and shapes."""
        while self.queue and len(self.runs) < self.slots:
            run = self.opened(self.queue.pop(0))
            if run is None:
                continue
            log.info("%s joins the pack (%d of %d slots)", run.name, len(self.runs) + 1, self.slots)
            self.runs.append(run)
            self.size = max(self.size, len(self.runs))
            self.start(run, alone=False)
            if run in self.runs and self.stacks is not None:
                self.stacks.join(run.trainer)

    def fail(self, run: Run, error: Exception) -> None:
        if self.outcome.on_failure is OnFailure.RAISE:  # raised once the pack is done
            self.outcome.raised.append(error)
            return
        record_failed(run.opened.run_dir, error)
        try:
            run.opened.tracker.finish()
        except Exception as unfinished:  # noqa: BLE001 - its tracker's fault is its own too
            record_failed(None, unfinished)
        self.outcome.ended(run.index, None)

    def save_all(self) -> None:
        for run in self.runs:
            with run.log.speaking():
                run.trainer.save_last()


# --- one step: from the batches to the optimizer -----------------------------------------------------
Stepping = Tuple[Trainer, Iterator[List[int]]]  # a run and its stream of training batches


class Taker(NamedTuple):
    """A run taking part in one micro-batch of the step: its examples there, and their loss's
    weight (its share of the step)."""

    trainer: Trainer
    totals: StepTotals
    examples: List[Example]
    weight: float


def step(runs: Sequence[Stepping]) -> Tuple[float, List[float]]:
    """One optimizer step of every run (on one backbone); the step's seconds and each run's loss."""
    trainers = [trainer for trainer, _ in runs]
    backbone, autocast, device = trainers[0].backbone, trainers[0].autocast, trainers[0].device
    for trainer in trainers:
        trainer.begin_step()
    backbone.train()
    totals = [StepTotals() for _ in trainers]
    started = time.perf_counter()
    for round_ in range(max(t.config.grad_accum for t in trainers)):
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


def micro_batch(runs: Sequence[Stepping], totals: Sequence[StepTotals], round_: int) -> List[Taker]:
    """The runs that take part in micro-batch `round_` of the step (a run has `grad_accum` of
    them; a rank's shard may be empty), with their examples and their losses' weights."""
    takers = []
    for (trainer, stream), run_totals in zip(runs, totals):
        if round_ < trainer.config.grad_accum:
            rows, weight = trainer.next_examples(stream)
            if rows:
                takers.append(Taker(trainer, run_totals, rows, weight))
    return takers


def parts(trainer: Trainer) -> RunParts:
    """What the run's rows bring to a pass: readout, method, its method's draws, its dropout."""
    return RunParts(trainer.readout, trainer.method, functools.partial(trainer.randomness.active, trainer.device),
                    trainer.dropout)  # fmt: skip


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


def backward_loss(
    method: PromptMethod, backbone: Backbone, readout: TaskReadout, batch: Dict[str, torch.Tensor], autocast,
    weight: float = 1.0, dropout: Optional[DropoutStream] = None,
) -> float:  # fmt: skip
    """One batch's training loss, backpropagated scaled by `weight`; returns the unscaled loss.
    A method's own passes (`PromptMethod.training_loss`), shared with the benchmark."""
    with autocast():
        loss = method.training_loss(backbone, readout, batch, dropout)
    (loss if weight == 1.0 else loss * weight).backward()
    return loss.item()

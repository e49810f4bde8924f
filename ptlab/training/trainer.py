"""One run's training state and parts: its optimizer, lr schedule, random streams, step count,
evaluations, checkpoints and tracker. Plain PyTorch, readable top to bottom.

The loop that drives it, from each batch to each optimizer step, is ptlab/training/loop.py (a run
alone is a pack of one there). Only the prompt method's parameters (and the
encoder family's head) are trained. The state is checkpointed at every evaluation
(ptlab/training/checkpoint.py), so a killed run resumed with `trainer.resume` ends with the same
metrics as an uninterrupted one; evaluation is ptlab/training/evaluate.py.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup
from transformers.optimization import Adafactor

from ptlab.config.schema import Config, TrainerConfig
from ptlab.data.examples import Example, chunks, training_batches
from ptlab.errors import ConfigError, TrainingFault
from ptlab.model.backbone import trainable_parameters
from ptlab.model.dropout_stream import DropoutStream
from ptlab.training.build import Pipeline
from ptlab.training.checkpoint import RunCheckpoint
from ptlab.training.devices import to_device
from ptlab.training.evaluate import baseline_metrics
from ptlab.training.memory import peak_memory_mb
from ptlab.training.progress import TrainLine
from ptlab.training.stacks import Stack
from ptlab.training.stages import StageSchedule, StepFlops
from ptlab.training.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    examples_seen: int = 0
    train_seconds: float = 0.0
    best_score: Optional[float] = None
    best_step: Optional[int] = None
    best_metrics: Dict[str, float] = field(default_factory=dict)
    evals_without_improvement: int = 0
    last_metrics: Dict[str, float] = field(default_factory=dict)
    flops: float = 0.0  # analytic training FLOPs so far (ptlab/model/flops.py)
    full_model_flops: float = 0.0  # the same steps on the full model
    stages: List[Dict[str, float]] = field(default_factory=list)  # per stage: steps, flops, seconds


@dataclass
class StepTotals:
    """What one optimizer step of a run adds up over its micro-batches: its loss (each
    micro-batch's weighted by its share of the step) and its training FLOPs."""

    loss: float = 0.0
    flops: float = 0.0  # on the model it trains (a partial one in FPT's early stages)
    full_flops: float = 0.0  # the same batches on the full model

    def add_flops(self, flops: StepFlops) -> None:
        self.flops += flops.actual
        self.full_flops += flops.full


@dataclass
class LogWindow:
    """Losses and examples since the last train log line."""

    losses: List[float] = field(default_factory=list)
    examples: int = 0
    started: float = field(default_factory=time.perf_counter)

    def log(self, tracker: Tracker, step: int, lr: float, flops: float) -> TrainLine:
        """Log the mean loss and throughput of the window, and return them."""
        loss = float(np.mean(self.losses))
        examples_per_s = self.examples / max(time.perf_counter() - self.started, 1e-9)
        tracker.log(step, "train", {"loss": loss, "lr": lr, "examples_per_s": examples_per_s, "flops": flops})
        return TrainLine(loss, lr, examples_per_s)


def build_optimizer(
    params: List[torch.nn.Parameter], config: TrainerConfig, device: torch.device
) -> torch.optim.Optimizer:
    if config.optimizer == "adafactor":
        # the prompt-tuning recipe: fixed lr, no relative step, no parameter scaling (Lester et al.)
        return Adafactor(
            params,
            lr=config.lr,
            weight_decay=config.weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=device.type == "cuda")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainerConfig, total_steps: int):
    warmup = int(config.warmup_ratio * total_steps)
    if config.lr_schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, num_training_steps=total_steps)
    return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)


def non_finite_loss(
    loss: float, step: int, last_finite: Optional[float], lr: float, last_dir: Path
) -> TrainingFault:
    """The one-line report of a loss that is nan or inf, with what to try and what was kept."""
    kept = last_dir if last_dir.exists() else "none yet"
    return TrainingFault(
        f"training loss is {loss} at step {step} (last finite loss {last_finite}, lr {lr:g}): "
        f"lower trainer.lr or set trainer.grad_clip; last good checkpoint: {kept}"
    )


def total_steps(config: TrainerConfig, num_train_examples: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    per_epoch = math.ceil(num_train_examples / config.batch_size / config.grad_accum)
    return max(1, math.ceil(config.epochs * per_epoch))


class Trainer:
    """One run's prompt training: its parts, its state, and what it does at each point of the loop
    (a step's start and its optimizer update, the log line, evaluation, checkpoints, the end)."""

    def __init__(self, *, config: Config, pipeline: Pipeline, tracker: Tracker, run_dir: Path) -> None:
        self.config, self.task, self.seed = config.trainer, config.task, config.seed
        self.pipeline, self.backbone, self.method = pipeline, pipeline.backbone, pipeline.method
        self.readout = pipeline.readout
        self.data, self.world, self.randomness = pipeline.data, pipeline.world, pipeline.randomness
        self.tracker, self.run_dir = tracker, run_dir
        self.dropout = DropoutStream(config.seed, self.world.rank)  # its frozen-network dropout's address
        self.train_lengths = [len(example.source_ids) for example in self.data["train"]]
        self.baseline = baseline_metrics(self.task, self.data["validation"])  # the floor a prompt must beat
        self.device, self.autocast = pipeline.place(), pipeline.autocast
        self.params = trainable_parameters(self.method, self.readout)
        if not self.params:
            raise ConfigError("the method has no trainable parameters")
        self.num_trainable = sum(p.numel() for p in self.params)
        # the run's optimizer in a solo run's format: its lr schedule writes the lr there, its state is
        # kept there between packs; a pack steps it as a slice of a stack (ptlab/training/stacks.py)
        self.optimizer = build_optimizer(self.params, self.config, self.device)
        self.stack: Optional[Stack] = None
        self.total_steps = total_steps(self.config, len(self.data["train"]))
        self.lr_scheduler = build_lr_scheduler(self.optimizer, self.config, self.total_steps)
        self.eval_batch_size = self.config.eval_batch
        self.stage_schedule = StageSchedule(config.stages, self.backbone, self.total_steps)
        stages = [{"steps": 0, "flops": 0.0, "seconds": 0.0} for _ in config.stages.stages]
        self.state = TrainState(stages=stages)
        self.checkpoint = RunCheckpoint(run_dir, self.method, self.readout, self.optimizer, self.lr_scheduler,
                                        self.randomness, pipeline.prompt_config(), writes=self.world.is_main)  # fmt: skip
        self.stop_at: Optional[int] = None  # a successive-halving rung's step, where this round ends it
        self.fit_started = time.perf_counter()
        self.scoring_seconds = 0.0  # FPT's neuron scoring in this process (0: none, or cached)
        self.last_finite_loss: Optional[float] = None

    # --- checkpoints and evaluation --------------------------------------------------------
    def resume(self, run_dir: Path) -> bool:
        """Continue from `run_dir/checkpoints/last` if there is one; True when the run does."""
        saved = self.checkpoint.restore(run_dir)
        if saved is None:
            return False
        self.state = TrainState(**saved)
        self.tracker.truncate_after(self.state.step)
        return True

    def save_last(self) -> None:
        if self.stack is not None:  # its optimizer's state lives in its stack while it trains
            self.stack.sync(self)
        self.checkpoint.save_last(asdict(self.state))

    def run_eval(self, split: str) -> Dict[str, float]:
        return self.pipeline.evaluate(split, self.eval_batch_size)

    def record_eval(self, metrics: Dict[str, float]) -> bool:
        """Log a validation result, keep the best prompt, checkpoint; True when patience ran out."""
        self.state.last_metrics = metrics
        # curves against compute: train_s (training seconds, all sessions of the run), flops (training
        # FLOPs so far) and wall_s (this process's training and evaluation seconds)
        clocks = {"train_s": self.state.train_seconds, "flops": self.state.flops,
                  "wall_s": time.perf_counter() - self.fit_started}  # fmt: skip
        self.tracker.log(self.state.step, "validation", {**metrics, **clocks})
        if self.scheduled_eval():  # a rung's look alone leaves the best prompt and patience the full run's
            self.keep_if_best(metrics)
        self.save_last()
        self.world.barrier()
        return self.config.patience is not None and self.state.evals_without_improvement >= self.config.patience

    def keep_if_best(self, metrics: Dict[str, float]) -> None:
        """The best prompt so far kept (and patience counted) by the task's main metric."""
        score = metrics[self.task.main_metric]
        if self.state.best_score is None or score > self.state.best_score:
            self.state.best_score, self.state.best_step, self.state.best_metrics = score, self.state.step, metrics
            self.state.evals_without_improvement = 0
            self.checkpoint.save_best(self.method.export_prompt())
        else:
            self.state.evals_without_improvement += 1

    # --- one step ----------------------------------------------------------------------------
    def neuron_scoring_passes(self) -> Iterator[None]:
        """Forward passes with the untrained prompt over the first training examples (FPT's
        neuron importance); yields after each batch."""
        examples = self.data["train"][: self.stage_schedule.config.score_examples]
        self.backbone.eval()
        self.method.eval()
        with torch.no_grad(), self.backbone.per_example_prompt_states():
            for group in chunks(examples, self.eval_batch_size):
                with self.autocast():
                    self.backbone.output_logits(
                        self.readout,
                        self.method,
                        to_device(self.backbone.collate(self.readout, group), self.device),
                    )
                yield

    def begin_step(self) -> None:
        """Before a step: the stage it trains in, gradients cleared, the method in training mode."""
        self.enter_stage()
        self.dropout.at_step(self.state.step)
        for param in self.params:  # the optimizer's zero_grad, without its profiler record per run
            param.grad = None
        self.method.train()

    def next_examples(self, stream: Iterator[List[int]]) -> Tuple[List[Example], float]:
        """The run's next global batch (one of its `grad_accum` per step): this rank's shard of it,
        and the weight of the shard's loss (its share of the step), so that the gradients summed
        over ranks and micro-batches equal one process's."""
        indices = next(stream)
        mine = self.world.shard(indices)
        self.state.examples_seen += len(indices)
        weight = len(mine) / len(indices) / self.config.grad_accum
        return [self.data["train"][i] for i in mine], weight

    def batch_flops(self, examples: List[Example]) -> StepFlops:
        """This run's training FLOPs on a batch of `examples` (padded as `collate` pads them), on
        the model it trains and on the full model."""
        return self.stage_schedule.batch_flops(
            len(examples),
            max(len(example.source_ids) for example in examples),
            max(len(self.readout.choice_ids[example.label]) for example in examples),
            self.method,
            self.backbone.runs_prompt_once(self.method),
        )

    def reduce(self, totals: StepTotals) -> None:
        """Once this rank's gradients are in: gradients and `totals` summed over ranks, ready for
        the optimizer step (its stack's)."""
        self.world.sum_gradients(self.params)
        if self.world.size > 1:
            summed = self.world.sum_(torch.tensor([totals.loss, totals.flops, totals.full_flops], dtype=torch.float64))
            totals.loss, totals.flops, totals.full_flops = summed.tolist()

    def count_update(self, totals: StepTotals) -> float:
        """After the optimizer step: the lr schedule's step, the step counted; returns the loss."""
        self.lr_scheduler.step()
        self.state.step += 1
        self.state.flops += totals.flops
        self.state.full_model_flops += totals.full_flops
        self.state.stages[self.stage_schedule.current]["flops"] += totals.flops
        return totals.loss

    def enter_stage(self) -> None:
        """Before a step: the stage it trains in (FPT's partial models), logged when it changes."""
        stage = self.stage_schedule.enter(self.state.step)
        if stage is not None and len(self.state.stages) > 1:
            log.info("step %d: stage %s", self.state.step, stage)
            self.tracker.log(self.state.step, "stage", stage)

    def count_step(self, loss: float, elapsed: float, examples: int, window: LogWindow) -> None:
        """A finished step's seconds, loss and examples into the state and the log window; a loss
        that is not finite ends the run here."""
        self.state.train_seconds += elapsed
        self.state.stages[self.stage_schedule.current]["seconds"] += elapsed
        self.state.stages[self.stage_schedule.current]["steps"] += 1
        if not math.isfinite(loss):
            lr = self.lr_scheduler.get_last_lr()[0]
            raise non_finite_loss(loss, self.state.step, self.last_finite_loss, lr, self.checkpoint.last_dir)
        self.last_finite_loss = loss
        window.losses.append(loss)
        window.examples += examples

    # --- the loop -------------------------------------------------------------------------------
    def start_fit(self, neuron_scores: Optional[List[torch.Tensor]] = None) -> Iterator[List[int]]:
        """The stream of training batches from where the run stands (and FPT's neuron scores;
        `neuron_scores`: ones a packmate with the same inputs has computed)."""
        self.fit_started = time.perf_counter()
        stream = training_batches(self.train_lengths, self.config, self.seed, self.state)
        if self.stage_schedule.needs_scores:  # FPT's width reduction: a fixed cost outside train_seconds
            started = time.perf_counter()
            self.stage_schedule.prepare_scores(
                self.run_dir, self.neuron_scoring_passes, write=self.world.is_main, known=neuron_scores
            )
            self.scoring_seconds = time.perf_counter() - started
        return stream

    def log_if_due(self, window: LogWindow) -> Optional[TrainLine]:
        """After a step: the train log line when one is due (its means), else None."""
        if self.state.step % self.config.log_every and self.state.step != self.total_steps:
            return None
        return window.log(self.tracker, self.state.step, self.lr_scheduler.get_last_lr()[0], self.state.flops)

    def scheduled_eval(self) -> bool:
        """Whether the run alone evaluates after this step: every `eval_every` and at the end."""
        return self.state.step % self.config.eval_every == 0 or self.state.step == self.total_steps

    def eval_due(self) -> bool:
        """After a step: whether it evaluates (scheduled, or at the rung it stops at; partial
        models are not evaluated)."""
        return (self.scheduled_eval() or self.state.step == self.stop_at) and self.stage_schedule.is_full

    @property
    def end_step(self) -> int:
        """The step this round of training ends at: its last, or the rung it stops at."""
        return min(self.total_steps, self.stop_at or self.total_steps)

    def out_of_memory(self, error: Exception) -> TrainingFault:
        """The one-line report of this run's step that ran out of memory alone, with the sizes to lower."""
        last = self.checkpoint.last_dir
        return TrainingFault(
            f"out of memory in a training step ({str(error).strip().splitlines()[0][:160]}) at trainer.batch_size="
            f"{self.config.batch_size}, data.max_source_length={self.readout.max_source_length}: lower them, or raise "
            f"trainer.grad_accum to keep the effective batch; last good checkpoint: {last if last.exists() else 'none yet'}"
        )

    def finish_fit(self, stopped_early: bool) -> Dict[str, Any]:
        """The best prompt scored on the test split if the task has one; the run's summary."""
        test_metrics = None
        if "test" in self.data:  # the SMoP protocol's held-out test split, scored with the best prompt
            self.checkpoint.load_best()
            test_metrics = self.run_eval("test")
            self.tracker.log(self.state.step, "test", test_metrics)
        return run_summary(self, stopped_early, test_metrics)


def run_summary(
    trainer: Trainer, stopped_early: bool, test_metrics: Optional[Dict[str, float]]
) -> Dict[str, Any]:
    """The numbers a finished run reports (summary.json, W&B summary)."""
    state = trainer.state
    return {
        "best": {"step": state.best_step, **state.best_metrics},
        "final": state.last_metrics,
        "test": test_metrics,
        "main_metric": trainer.task.main_metric,
        "baseline": trainer.baseline,
        "test_baseline": baseline_metrics(trainer.task, trainer.data["test"]) if test_metrics else None,
        "pack_size": 1,  # a pack says how many runs shared this one's time and memory
        "steps": state.step,
        "stopped_early": stopped_early,
        "trainable_params": trainer.num_trainable,
        "train_seconds": state.train_seconds,
        "neuron_scoring_seconds": trainer.scoring_seconds,
        "examples_per_s": state.examples_seen / max(state.train_seconds, 1e-9),
        "peak_memory_mb": peak_memory_mb(trainer.device),
        "train_flops": state.flops,
        "full_model_flops": state.full_model_flops,
        "flops_ratio": state.flops / max(state.full_model_flops, 1.0),
        "stages": [
            {**asdict(stage), **stats}
            for stage, stats in zip(trainer.stage_schedule.config.stages, state.stages)
        ],
    }

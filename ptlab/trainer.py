"""The training loop: plain PyTorch, readable top to bottom.

Only the prompt method's parameters (and the encoder family's head) are trained. A run's
full state (parameters, optimizer, scheduler, RNG streams, data position, early-stopping
state) is checkpointed atomically at every evaluation, so a killed run resumed with
`trainer.resume` ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import resource
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup
from transformers.optimization import Adafactor

from ptlab import checkpoint
from ptlab.backbones import Backbone, trainable_parameters
from ptlab.config import ConfigError, HardwareConfig, ScheduleConfig, TaskConfig, TrainerConfig
from ptlab.data import TaskData, chunks, epoch_batches
from ptlab.distributed import World
from ptlab.evaluate import predict_examples, to_device
from ptlab.methods.base import PromptMethod
from ptlab.metrics import compute_metrics
from ptlab.schedule import StageSchedule
from ptlab.tracking import Tracker

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
    flops: float = 0.0  # analytic training FLOPs so far (ptlab/flops.py)
    full_model_flops: float = 0.0  # the same steps on the full model
    stages: List[Dict[str, float]] = field(default_factory=list)  # per stage: steps, flops, seconds


class Preempted(Exception):
    """Raised at a step boundary after a termination signal, once the checkpoint is written."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint saved, rerun to resume")
        self.signum = signum


# SLURM sends SIGUSR1/SIGUSR2 (--signal) before its time limit and SIGTERM on preemption
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> Dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on GPU; the process's RSS high-water mark on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_optimizer(
    params: List[torch.nn.Parameter], cfg: TrainerConfig, device: torch.device
) -> torch.optim.Optimizer:
    if cfg.optimizer == "adafactor":
        # the prompt-tuning recipe: fixed lr, no relative step, no parameter scaling (Lester et al.)
        return Adafactor(
            params,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")


class Trainer:
    def __init__(
        self,
        backbone: Backbone,
        method: PromptMethod,
        data: TaskData,
        task: TaskConfig,
        cfg: TrainerConfig,
        hardware: HardwareConfig,
        schedule: ScheduleConfig,
        tracker: Tracker,
        run_dir: Path,
        seed: int,
        prompt_config: Dict[str, Any],
        world: Optional[World] = None,
    ) -> None:
        self.backbone, self.method, self.data, self.task, self.cfg = backbone, method, data, task, cfg
        self.tracker, self.run_dir, self.seed, self.prompt_config = tracker, run_dir, seed, prompt_config
        self.world = world or World()
        self.train_lengths = [len(example.source_ids) for example in data["train"]]
        self.device = torch.device(f"cuda:{self.world.local_rank}" if hardware.device == "cuda" else "cpu")
        self.use_bf16 = hardware.precision == "bf16" and self.device.type == "cuda"
        self.backbone.to(self.device)
        self.method.to(self.device)
        self.params = trainable_parameters(method, backbone)
        if not self.params:
            raise ConfigError("the method has no trainable parameters")
        self.num_trainable = sum(p.numel() for p in self.params)
        self.optimizer = build_optimizer(self.params, cfg, self.device)
        self.total_steps = self._total_steps()
        warmup = int(cfg.warmup_ratio * self.total_steps)
        make_schedule = (
            get_linear_schedule_with_warmup
            if cfg.lr_schedule == "linear"
            else get_constant_schedule_with_warmup
        )
        extra = {"num_training_steps": self.total_steps} if cfg.lr_schedule == "linear" else {}
        self.scheduler = make_schedule(self.optimizer, num_warmup_steps=warmup, **extra)
        self.eval_batch_size = cfg.eval_batch_size or 2 * cfg.batch_size
        self.schedule = StageSchedule(schedule, backbone, self.total_steps)
        self.state = TrainState(stages=[{"steps": 0, "flops": 0.0, "seconds": 0.0} for _ in schedule.stages])
        self.last_dir = run_dir / "checkpoints" / "last"
        self.best_dir = run_dir / "checkpoints" / "best"
        self.pending_signal: Optional[int] = None
        self.fit_started = time.perf_counter()

    def _total_steps(self) -> int:
        if self.cfg.max_steps is not None:
            return self.cfg.max_steps
        per_epoch = math.ceil(len(self.data["train"]) / self.cfg.batch_size / self.cfg.grad_accum)
        return max(1, math.ceil(self.cfg.epochs * per_epoch))

    def autocast(self):
        if self.use_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- data ---------------------------------------------------------------------------
    def microbatches(self) -> Iterator[List[int]]:
        """Endless stream of training index batches from the saved data position on. Batches are
        drawn per optimizer step and then split into micro-batches, so an optimizer step sees the
        same examples whatever `grad_accum` is."""
        step_size = self.cfg.batch_size * self.cfg.grad_accum
        while True:
            steps = epoch_batches(
                self.train_lengths, step_size, self.seed, self.state.epoch, self.cfg.group_by_length
            )
            batches = [batch for step in steps for batch in chunks(step, self.cfg.batch_size)]
            while self.state.batch_in_epoch < len(batches):
                indices = batches[self.state.batch_in_epoch]
                self.state.batch_in_epoch += 1
                yield indices
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    # --- checkpoints ----------------------------------------------------------------------
    def trainable_state(self) -> Dict[str, torch.Tensor]:
        state = {f"method.{k}": v for k, v in self.method.state_dict().items()}
        state.update({f"backbone.{n}": p for n, p in self.backbone.named_parameters() if p.requires_grad})
        return state

    def load_trainable_state(self, state: Dict[str, torch.Tensor]) -> None:
        self.method.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("method.")})
        backbone_params = dict(self.backbone.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                if key.startswith("backbone."):
                    backbone_params[key[9:]].copy_(value)

    def save_last(self) -> None:
        if not self.world.is_main:
            return

        def write(folder: Path) -> None:
            checkpoint.save_training_state(
                folder,
                {
                    "trainable": {k: v.detach().cpu() for k, v in self.trainable_state().items()},
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": rng_states(),
                    "train_state": asdict(self.state),
                    "prompt_config": self.prompt_config,
                },
            )

        checkpoint.write_atomic_dir(self.last_dir, write)

    def save_best(self) -> None:
        if not self.world.is_main:
            return
        trainable, exported = self.trainable_state(), self.method.export_prompt()
        checkpoint.write_atomic_dir(
            self.best_dir,
            lambda folder: checkpoint.save_prompt(folder, trainable, exported, self.prompt_config),
        )

    def resume(self, source_dir: Path) -> bool:
        """Load `source_dir/checkpoints/last` if there is one; True when the run continues from it."""
        folder = checkpoint.find(source_dir / "checkpoints" / "last")
        if folder is None:
            log.info("no checkpoint under %s: starting from step 0", source_dir)
            return False
        saved = checkpoint.load_training_state(folder)
        for key in ("method", "backbone", "task"):
            if saved["prompt_config"].get(key) != self.prompt_config.get(key):
                raise ConfigError(
                    f"trainer.resume: the checkpoint in {folder} was trained with {key}="
                    f"{saved['prompt_config'].get(key)!r}, this run has {self.prompt_config.get(key)!r}"
                )
        self.load_trainable_state(saved["trainable"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        restore_rng_states(saved["rng"])
        self.state = TrainState(**saved["train_state"])
        self.tracker.truncate_after(self.state.step)
        log.info("resumed from %s at step %d", folder, self.state.step)
        return True

    # --- evaluation -------------------------------------------------------------------------
    def run_eval(self, split: str) -> Dict[str, float]:
        """The task's metrics on `split`; each rank predicts its shard and all ranks get all of them."""
        examples = self.data[split]
        mine = self.world.shard(list(range(len(examples))))
        preds = predict_examples(
            self.backbone,
            self.method,
            [examples[i] for i in mine],
            self.eval_batch_size,
            self.device,
            self.autocast,
            self.cfg.eval_mode,
            self.cfg.max_new_tokens,
        )
        by_index = {i: p for shard in self.world.gather(list(zip(mine, preds))) for i, p in shard}
        metrics = compute_metrics(
            list(self.task.metrics),
            [by_index[i] for i in range(len(examples))],
            [example.label for example in examples],
            list(self.task.verbalizers),
            groups=[example.group for example in examples],
            target_values=[example.target_value for example in examples],
        )
        metrics.update({f"router_{k}": v for k, v in self.method.eval_stats().items()})
        return metrics

    def eval_and_checkpoint(self) -> bool:
        """Evaluate on validation, keep the best prompt, checkpoint; True when patience ran out."""
        metrics = self.run_eval("validation")
        self.state.last_metrics = metrics
        # wall_s: seconds of this process's training and evaluation so far (time-to-accuracy)
        self.tracker.log(
            self.state.step, "validation", {**metrics, "wall_s": time.perf_counter() - self.fit_started}
        )
        score = metrics[self.task.main_metric]
        if self.state.best_score is None or score > self.state.best_score:
            self.state.best_score, self.state.best_step, self.state.best_metrics = (
                score,
                self.state.step,
                metrics,
            )
            self.state.evals_without_improvement = 0
            self.save_best()
        else:
            self.state.evals_without_improvement += 1
        self.save_last()
        self.world.barrier()
        return self.cfg.patience is not None and self.state.evals_without_improvement >= self.cfg.patience

    # --- the loop -------------------------------------------------------------------------------
    def batch_flops(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """[this step's FLOPs on the current model, the same on the full model] for one batch."""
        prompt = self.method.num_tokens
        shared = prompt if self.backbone.shares_prompt_states(self.method) else 0
        flops = self.schedule.step_flops(
            len(batch["labels"]), batch["source_ids"].shape[1] + prompt, batch["target_ids"].shape[1], shared
        )
        return torch.tensor(flops, dtype=torch.float64)

    def neuron_scoring_passes(self) -> Iterator[None]:
        """Forward passes with the untrained prompt over the first training examples (FPT's
        neuron importance); yields after each batch."""
        examples = self.data["train"][: self.schedule.cfg.score_examples]
        self.backbone.eval()
        self.method.eval()
        with torch.no_grad(), self.backbone.per_example_prompt_states():
            for group in chunks(examples, self.eval_batch_size):
                with self.autocast():
                    self.backbone.output_logits(
                        self.method, to_device(self.backbone.collate(group), self.device)
                    )
                yield

    def train_step(self, stream: Iterator[List[int]]) -> float:
        """One optimizer step over `grad_accum` global batches; each rank takes its shard and
        weights its loss by the shard's share, so the summed gradients equal one process's."""
        self.optimizer.zero_grad(set_to_none=True)
        totals = torch.zeros(3, dtype=torch.float64)  # loss, FLOPs, full-model FLOPs
        for _ in range(self.cfg.grad_accum):
            indices = next(stream)
            mine = self.world.shard(indices)
            self.state.examples_seen += len(indices)
            if not mine:
                continue
            batch = to_device(self.backbone.collate([self.data["train"][i] for i in mine]), self.device)
            with self.autocast():
                loss = self.method.training_loss(self.backbone, batch)
            weight = len(mine) / len(indices) / self.cfg.grad_accum
            (loss * weight).backward()
            totals[0] += loss.item() * weight
            totals[1:] += self.batch_flops(batch)
        if self.world.size > 1:
            for param in self.params:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
            grads = torch.cat([param.grad.flatten() for param in self.params])
            self.world.sum_(grads)
            offset = 0
            for param in self.params:
                param.grad.copy_(grads[offset : offset + param.numel()].view_as(param))
                offset += param.numel()
            self.world.sum_(totals)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        self.state.flops += float(totals[1])
        self.state.full_model_flops += float(totals[2])
        self.state.stages[self.schedule.current]["flops"] += float(totals[1])
        return float(totals[0])

    def on_signal(self, signum: int, frame) -> None:
        """Remember the signal; the loop checkpoints at the next step boundary and stops."""
        log.warning("received %s: checkpointing after this step", signal.Signals(signum).name)
        self.pending_signal = signum

    @contextlib.contextmanager
    def preemption_handlers(self):
        """SIGTERM/SIGUSR1/SIGUSR2 save a resumable checkpoint at the next step boundary; a
        handler installed before ours (submitit's requeue) is called after the save."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield {}
            return
        previous = {signum: signal.signal(signum, self.on_signal) for signum in PREEMPTION_SIGNALS}
        try:
            yield previous
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def stop_if_signalled(self, previous: Dict[int, Any]) -> None:
        if self.pending_signal is None:
            return
        self.save_last()
        signum, self.pending_signal = self.pending_signal, None
        log.warning("checkpoint saved at step %d after %s", self.state.step, signal.Signals(signum).name)
        handler = previous.get(signum)
        if callable(handler):
            handler(signum, None)
        raise Preempted(signum, self.state.step)

    def fit(self) -> Dict[str, Any]:
        """Train to `total_steps` (or early stop), then evaluate the best prompt; returns the summary."""
        self.fit_started = time.perf_counter()
        stream = self.microbatches()
        if self.schedule.needs_scores:
            self.schedule.prepare_scores(self.run_dir, self.neuron_scoring_passes, write=self.world.is_main)
        progress = tqdm(
            disable=not self.world.is_main or None,
            total=self.total_steps,
            initial=self.state.step,
            desc="train",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        window_loss, window_examples, window_start = [], 0, time.perf_counter()
        stopped_early = False
        with self.preemption_handlers() as previous_handlers:
            while self.state.step < self.total_steps and not stopped_early:
                stage = self.schedule.enter(self.state.step)
                if stage is not None and len(self.state.stages) > 1:
                    log.info("step %d: stage %s", self.state.step, stage)
                    self.tracker.log(self.state.step, "stage", stage)
                self.backbone.train()
                self.method.train()
                seen_before = self.state.examples_seen
                started = time.perf_counter()
                loss = self.train_step(stream)
                elapsed_step = time.perf_counter() - started
                self.state.train_seconds += elapsed_step
                self.state.stages[self.schedule.current]["seconds"] += elapsed_step
                self.state.stages[self.schedule.current]["steps"] += 1
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss is {loss} at step {self.state.step}: lower trainer.lr={self.cfg.lr}"
                    )
                window_loss.append(loss)
                window_examples += self.state.examples_seen - seen_before
                progress.update(1)
                if self.state.step % self.cfg.log_every == 0 or self.state.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    self.tracker.log(
                        self.state.step,
                        "train",
                        {
                            "loss": float(np.mean(window_loss)),
                            "lr": self.scheduler.get_last_lr()[0],
                            "examples_per_s": window_examples / max(elapsed, 1e-9),
                            "flops": self.state.flops,
                        },
                    )
                    progress.set_postfix(loss=f"{np.mean(window_loss):.4f}", refresh=False)
                    window_loss, window_examples, window_start = [], 0, time.perf_counter()
                at_eval = self.state.step % self.cfg.eval_every == 0 or self.state.step == self.total_steps
                if at_eval and self.schedule.is_full:  # partial models are not evaluated or kept as best
                    stopped_early = self.eval_and_checkpoint()
                    progress.set_postfix(
                        loss=f"{loss:.4f}",
                        **{
                            f"val_{self.task.main_metric}": f"{self.state.last_metrics[self.task.main_metric]:.4f}"
                        },
                    )
                self.stop_if_signalled(previous_handlers)
        progress.close()
        return self.finish(stopped_early)

    def finish(self, stopped_early: bool) -> Dict[str, Any]:
        test_metrics = None
        if "test" in self.data:
            best = checkpoint.find(self.best_dir)
            if best is not None:
                self.load_trainable_state(load_file(best / "prompt.safetensors"))
            test_metrics = self.run_eval("test")
            self.tracker.log(self.state.step, "test", test_metrics)
        return {
            "best": {"step": self.state.best_step, **self.state.best_metrics},
            "final": self.state.last_metrics,
            "test": test_metrics,
            "main_metric": self.task.main_metric,
            "steps": self.state.step,
            "stopped_early": stopped_early,
            "trainable_params": self.num_trainable,
            "train_seconds": self.state.train_seconds,
            "examples_per_s": self.state.examples_seen / max(self.state.train_seconds, 1e-9),
            "peak_memory_mb": peak_memory_mb(self.device),
            "train_flops": self.state.flops,
            "full_model_flops": self.state.full_model_flops,
            "flops_ratio": self.state.flops / max(self.state.full_model_flops, 1.0),
            "stages": [
                {**asdict(stage), **stats}
                for stage, stats in zip(self.schedule.cfg.stages, self.state.stages)
            ],
        }

"""FPT's stages (the `stages` group): which (partial) model each step trains, and what each step
costs in FLOPs. `stages=constant` is one stage on the full model; `stages=fpt*` (Huang et al.
2022) trains on partial models first and grows them stage by stage. The prompt and the optimizer
are untouched by a stage change: the same tensors and the same optimizer state carry over
("prompt recycling").
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ptlab.config.schema import Config, StagesConfig
from ptlab.files import write_file_atomically
from ptlab.methods.base import PromptMethod
from ptlab.model.backbone import Backbone
from ptlab.model.flops import BatchSizes, ModelShape
from ptlab.model.partial import PartialModel
from ptlab.training.checkpoint import read_plain

log = logging.getLogger(__name__)


class StepFlops(NamedTuple):
    """A step's training FLOPs on the model it trained (a partial one in FPT's early stages) and on
    the full model."""

    actual: float
    full: float


def stage_ends(config: StagesConfig, total_steps: int) -> List[int]:
    """The step each stage ends at (exclusive): its share of `total_steps`, the last at the end."""
    ends, done = [], 0.0
    for stage in config.stages:
        done += stage.steps_fraction
        ends.append(round(done * total_steps))
    ends[-1] = total_steps
    return ends


def partial_at(config: StagesConfig, total_steps: int, step: int) -> bool:
    """Whether the model a run evaluates after `step` steps is a partial one (FPT's early stages)."""
    ends = stage_ends(config, total_steps)
    stage = config.stages[next(i for i, end in enumerate(ends) if step - 1 < end or i == len(ends) - 1)]
    return (stage.depth, stage.width) != (1.0, 1.0)


class StageSchedule:
    def __init__(self, config: StagesConfig, backbone: Backbone, total_steps: int) -> None:
        self.config = config
        self.family = type(backbone)  # the family's class, which counts its analytic FLOPs
        self.shape = ModelShape.from_config(backbone.model.config)
        self.stage_ends = stage_ends(config, total_steps)
        self.partial = PartialModel(backbone.model, config.with_decoder) if config.shrinks_model else None
        self.current: Optional[int] = None

    @property
    def needs_scores(self) -> bool:
        return self.config.cuts_ffn_width

    @property
    def is_full(self) -> bool:
        return self.partial is None or self.partial.is_full

    def stage_of(self, step: int) -> int:
        return next(i for i, end in enumerate(self.stage_ends) if step < end or i == len(self.stage_ends) - 1)

    def prepare_scores(
        self,
        run_dir: Path,
        run_batches: Callable[[], Iterable],
        write: bool = True,
        known: Optional[List[torch.Tensor]] = None,
    ) -> None:
        """FFN neuron scores, computed once with the untrained prompt and cached in the run folder
        (a resumed run reloads them rather than scoring with its trained prompt). `known`: the
        scores a packmate with the same inputs computed (`stage_plan`), so the same ones."""
        cache = run_dir / "ffn_scores.pt"
        if cache.exists():
            self.partial.scores = read_plain(cache)
            return
        if known is not None:
            scores = self.partial.scores = known
        else:
            log.info("scoring FFN neurons on %d training examples", self.config.score_examples)
            scores = self.partial.score_neurons(run_batches)
        if not write:  # ranks other than 0 compute the same scores and leave the file to rank 0
            return
        write_file_atomically(cache, lambda tmp: torch.save(scores, tmp))

    def enter(self, step: int) -> Optional[Dict[str, object]]:
        """Switch the model to the stage of `step`; returns the new stage's facts on a change."""
        index = self.stage_of(step)
        if index == self.current:
            return None
        self.current = index
        stage = self.config.stages[index]
        if self.partial is not None:
            self.partial.set_stage(stage.depth, stage.width)
        facts = {"stage": index, "depth": stage.depth, "width": stage.width}
        if self.partial is not None:
            facts.update(self.partial.stage_facts())
        return facts

    def batch_flops(self, rows: int, source_width: int, target_width: int, method: PromptMethod,
                    shared_prompt: bool) -> StepFlops:  # fmt: skip
        """A training step's FLOPs on a batch of `rows` padded to `source_width` and `target_width`
        tokens, on the current model and on the full one; `shared_prompt`: the method's block runs
        once per batch (a causal LM's shared prompt)."""
        sizes = BatchSizes(
            rows=rows,
            source_tokens=source_width + method.num_tokens,
            target_tokens=target_width,
            shared_prompt=method.num_tokens if shared_prompt else 0,
            prefixes=method.prefix_positions,
        )
        full = self.family.train_step_flops(self.shape, sizes)
        if self.is_full:
            return StepFlops(full, full)
        layers: List[List[int]] = self.partial.kept_layers
        kept = self.shape.shrunk(
            encoder_layers=len(layers[0]),
            decoder_layers=len(layers[1]) if len(layers) > 1 else self.shape.decoder_layers,
            ffn=self.partial.kept_neurons,
            decoder_ffn=self.partial.kept_neurons if self.config.with_decoder else self.shape.decoder_ffn,
        )
        return StepFlops(self.family.train_step_flops(kept, sizes), full)


# --- staged runs sharing one backbone ------------------------------------------------------------
def partial_model_key(schedule: StageSchedule, step: int) -> Optional[Tuple]:
    """What a run's partial models depend on from `step`, where it stands: its stages and their
    ends, its neuron scores' use (None: no stage schedule, the full model throughout)."""
    if schedule.partial is None:
        return None
    stages = tuple((stage.depth, stage.width) for stage in schedule.config.stages)
    return step, stages, tuple(schedule.stage_ends), schedule.config.with_decoder


def same_scores(a: Optional[List[torch.Tensor]], b: Optional[List[torch.Tensor]]) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def stage_plan(config: Config) -> Optional[Dict[str, Any]]:
    """What fixes a staged job's partial models at every step (None: no stage schedule). Jobs with
    equal plans shrink and grow the backbone identically at the same steps, so they can share a
    pack. The kept FFN neurons come from scores of the untrained prompt on the first training
    examples (`StageSchedule.prepare_scores`): what makes them is part of the plan."""
    schedule = config.stages
    if not schedule.shrinks_model:
        return None
    trainer = config.trainer
    plan: Dict[str, Any] = {
        "stages": dataclasses.asdict(schedule),
        "steps": {key: getattr(trainer, key) for key in ("max_steps", "epochs", "batch_size", "grad_accum")},
    }
    if schedule.cuts_ffn_width:
        plan["neuron scores"] = {
            "seed": config.seed,
            "method": dataclasses.asdict(config.method),
            "task": dataclasses.asdict(config.task),
            "data": dataclasses.asdict(config.data),
            "trainer.eval_batch": trainer.eval_batch,
        }
    return plan


def known_scores(config: Config, earlier: Sequence[Tuple[Config, StageSchedule]]) -> Optional[List[torch.Tensor]]:
    """FFN neuron scores that a packmate started before this run (`earlier`: its config and
    schedule) ranked from the same inputs, so an FPT lr grid scores once, not once per run."""
    plan = stage_plan(config)
    if plan is None:
        return None
    for other, schedule in earlier:
        if stage_plan(other) == plan and schedule.partial.scores is not None:
            return schedule.partial.scores
    return None


@dataclasses.dataclass
class PartialModelPart:
    """Runs that shrink and grow the shared backbone identically: one partial model (`key`, None for
    the full model) with one set of neuron scores, and the runs' indices."""

    key: Optional[Tuple]
    scores: Optional[List[torch.Tensor]]
    runs: List[int] = dataclasses.field(default_factory=list)


def stage_partitions(runs: Sequence[Tuple[StageSchedule, int]]) -> List[List[int]]:
    """The runs (each its schedule and step), by index, in parts that train one after another: the
    runs of a part shrink and grow the shared backbone identically at every step. The launcher
    packs only staged jobs with one stage plan (`stage_plan`); runs resumed at other steps,
    or whose neuron scores differ after all, train after the others rather than on the wrong model."""
    parts: List[PartialModelPart] = []
    for index, (schedule, step) in enumerate(runs):
        key = partial_model_key(schedule, step)
        scores = None if schedule.partial is None else schedule.partial.scores
        part = next((p for p in parts if p.key == key and same_scores(p.scores, scores)), None)
        if part is None:
            part = PartialModelPart(key, scores)
            parts.append(part)
        part.runs.append(index)
    return [part.runs for part in parts]


def restore_full_model(schedules: Iterable[StageSchedule]) -> None:
    """The shared backbone back in its full form once staged runs are done with it."""
    for schedule in schedules:
        if schedule.partial is not None:
            schedule.partial.restore()
            return

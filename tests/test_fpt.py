"""FPT: layer lists, neuron slicing, exact growth, state carried across stages, resume, FLOPs."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ptlab.config.schema import to_object
from ptlab.errors import ConfigError
from ptlab.model.flops import BatchSizes, ModelShape
from ptlab.model.partial import PartialModel, evenly_spaced_layers
from ptlab.training import loop
from ptlab.training.job import run
from ptlab.training.trainer import Trainer

from conftest import TINY, compose_config
from helpers import build, examples

DEEP = {"tiny_t5": "num_layers", "tiny_llama": "num_hidden_layers", "tiny_bert": "num_hidden_layers"}
FAMILIES = list(DEEP)


def deep(backbone: str, layers: int = 8) -> list:
    return [
        f"backbone={backbone}",
        f"++backbone.random_init.{DEEP[backbone]}={layers}",
        "backbone.dropout=false",
    ]


def test_evenly_spaced_layers_equal_the_official_lists_for_24():
    assert evenly_spaced_layers(6, 24) == [0, 4, 8, 13, 18, 23]
    assert evenly_spaced_layers(12, 24) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 23]
    assert evenly_spaced_layers(18, 24) == list(range(12)) + [13, 15, 17, 19, 21, 23]
    assert evenly_spaced_layers(24, 24) == list(range(24))
    for kept in range(2, 25):
        layers = evenly_spaced_layers(kept, 24)
        assert len(layers) == kept and layers[0] == 0 and layers[-1] == 23 and layers == sorted(set(layers))


def outputs(backbone, readout, method, batch):
    with torch.no_grad():
        return backbone.output_logits(readout, method, batch)


@pytest.mark.parametrize("name", FAMILIES)
def test_neuron_slicing_equals_masking_those_neurons(name):
    _, backbone, readout, method = build(deep(name, 2))
    backbone.eval()
    batch = backbone.collate(readout, examples(backbone, readout))
    partial = PartialModel(backbone.model)
    partial.scores = [
        torch.randn(partial.ffn_width, generator=torch.Generator().manual_seed(i))
        for i in range(len(partial.ffns))
    ]
    masked = copy.deepcopy(backbone)
    keep_count = partial.ffn_width // 2
    for scores, masked_ffn in zip(partial.scores, PartialModel(masked.model).ffns):
        dropped = scores.topk(partial.ffn_width - keep_count, largest=False).indices
        with torch.no_grad():
            getattr(*masked_ffn.output).weight[:, dropped] = 0.0
    partial.set_stage(depth=1.0, width=0.5)
    assert partial.kept_neurons == keep_count
    assert torch.allclose(
        outputs(backbone, readout, method, batch), outputs(masked, readout, method, batch), atol=1e-5
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_growing_back_restores_exactly_the_original_function(name):
    _, backbone, readout, method = build(deep(name))
    backbone.eval()
    batch = backbone.collate(readout, examples(backbone, readout))
    untouched = copy.deepcopy(backbone)
    partial = PartialModel(backbone.model)
    with backbone.per_example_prompt_states():
        partial.score_neurons(lambda: (outputs(backbone, readout, method, batch) for _ in range(1)))
    for depth, width in [(0.25, 0.25), (0.5, 0.5), (0.75, 0.75)]:
        partial.set_stage(depth, width)
        shrunk = outputs(backbone, readout, method, batch)
        assert not torch.allclose(shrunk, outputs(untouched, readout, method, batch))
    partial.set_stage(1.0, 1.0)
    assert partial.is_full
    assert torch.equal(outputs(backbone, readout, method, batch), outputs(untouched, readout, method, batch))
    assert all(
        torch.equal(a, b)
        for a, b in zip(backbone.model.state_dict().values(), untouched.model.state_dict().values())
    )


def test_depth_reduction_keeps_first_and_last_block_and_t5_position_bias():
    _, backbone, _, _ = build(deep("tiny_t5"))
    partial = PartialModel(backbone.model)
    partial.set_stage(depth=0.25, width=1.0)
    blocks = backbone.model.encoder.block
    assert partial.kept_layers == [[0, 7]] and len(blocks) == 2
    assert blocks[0].layer[0].SelfAttention.has_relative_attention_bias
    assert len(backbone.model.decoder.block) == 2  # decoder untouched by default (tiny_t5 has 2)


def test_neuron_scores_are_mean_absolute_activations_over_real_tokens():
    _, backbone, readout, method = build(deep("tiny_bert", 2))
    backbone.eval()
    items = examples(backbone, readout)
    batch = backbone.collate(readout, items)
    partial = PartialModel(backbone.model)
    with backbone.per_example_prompt_states():
        scores = partial.score_neurons(lambda: (outputs(backbone, readout, method, batch) for _ in range(1)))
    # independent: hook the intermediate activation of layer 0 and average |.| over unmasked positions
    seen = {}
    hook = backbone.model.encoder.layer[0].output.dense.register_forward_pre_hook(
        lambda m, i: seen.update(x=i[0])
    )
    outputs(backbone, readout, method, batch)
    hook.remove()
    mask = torch.cat(
        [batch["source_mask"][:, :1], torch.ones(len(items), method.num_tokens), batch["source_mask"][:, 1:]],
        1,
    )
    expected = (seen["x"].abs() * mask[..., None]).sum((0, 1)) / mask.sum()
    assert torch.allclose(scores[0], expected, atol=1e-5)


def fpt_run(tmp_path, name, backbone="tiny_t5", extra=()):
    overrides = [
        *TINY,
        *deep(backbone),
        "stages=fpt",
        "trainer.max_steps=10",
        "trainer.eval_every=2",
        "trainer.log_every=1",
        "trainer.batch_size=8",
        "trainer.optimizer=adamw",
        "stages.score_examples=32",
        *extra,
    ]
    run(compose_config(overrides), run_dir=tmp_path / name)
    return tmp_path / name, json.loads((tmp_path / name / "summary.json").read_text())


def test_prompt_and_optimizer_state_carry_across_stages(tmp_path, monkeypatch):
    seen = []
    original = Trainer.begin_step

    def spy(self):
        original(self)  # the step's stage entered
        param, stack = self.method.prompt_embeds, self.stack  # a run alone: a stack of one
        index = stack.trainers.index(self)
        seen.append(
            (
                self.stage_schedule.current,
                id(param),
                param.data_ptr() == stack.tensors[0][index].data_ptr(),  # the prompt is its stack slice
                int(stack.optimizer.steps[index]),
                id(stack.optimizer.state[0]["exp_avg"]),
            )
        )

    monkeypatch.setattr(Trainer, "begin_step", spy)
    _, summary = fpt_run(tmp_path, "a")
    assert [s[0] for s in seen] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    assert len({s[1] for s in seen}) == 1 and all(s[2] for s in seen)  # one prompt tensor, in the optimizer
    assert [s[3] for s in seen] == list(range(10))  # optimizer state continues, never reset
    assert len({s[4] for s in seen}) == 1  # the same moment buffer throughout
    assert [stage["steps"] for stage in summary["stages"]] == [2, 2, 2, 4]


def test_fpt_saves_flops_and_reports_them(tmp_path):
    run_dir, summary = fpt_run(tmp_path, "a")
    assert 0.5 < summary["flops_ratio"] < 0.8
    assert summary["train_flops"] == pytest.approx(sum(stage["flops"] for stage in summary["stages"]))
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in events if e["split"] == "stage"] == [0, 1, 2, 3]
    assert {e["step"] for e in events if e["split"] == "validation"} == {8, 10}  # full model only
    _, constant = fpt_run(tmp_path, "b", extra=["stages=constant"])
    assert constant["flops_ratio"] == 1.0


def test_resume_in_the_middle_of_a_stage(tmp_path, monkeypatch):
    full_dir, full = fpt_run(tmp_path, "full", extra=["trainer.eval_every=1"])
    original = loop.step

    def dies_at_step_4(runs):
        if runs[0][0].state.step == 3:  # stage 1 spans steps 2-3; the last checkpoint is at step 3
            raise KeyboardInterrupt
        return original(runs)

    monkeypatch.setattr(loop, "step", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        fpt_run(tmp_path, "resumed", extra=["trainer.eval_every=1"])
    monkeypatch.setattr(loop, "step", original)
    scores_before = torch.load(tmp_path / "resumed/ffn_scores.pt")
    _, resumed = fpt_run(tmp_path, "resumed", extra=["trainer.eval_every=1", "trainer.resume=true"])
    assert all(
        torch.equal(a, b) for a, b in zip(scores_before, torch.load(tmp_path / "resumed/ffn_scores.pt"))
    )
    for key in ("best", "final", "steps", "train_flops"):
        assert resumed[key] == full[key]


@pytest.mark.parametrize("method", ["smop", "superpos", "residual", "deep_prompt"])
def test_fpt_composes_with_every_method(tmp_path, method):
    _, summary = fpt_run(tmp_path, method, extra=[f"method={method}"])
    assert summary["steps"] == 10 and summary["flops_ratio"] < 1.0


def test_method_fpt_is_prompt_tuning_on_the_fpt_schedule():
    config = to_object(compose_config(["recipe=fpt"]))
    assert config.method.name == "prompt_tuning" and config.stages.name == "fpt"
    assert config.method.init == "random" and config.backbone.dropout is False


@pytest.mark.parametrize(
    "override,message",
    [
        ("stages.stages.0.steps_fraction=0.5", "add up to 1.3"),
        ("stages.stages.3.depth=0.5", "last stage must train the full model"),
        ("stages.stages.0.width=0", r"stages.stages\[0\].width=0.0 must be in"),
    ],
)
def test_bad_schedules_are_clear_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        to_object(compose_config(["stages=fpt", override]))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("per_example", [False, True])
def test_analytic_flops_match_a_measured_count(name, per_example):
    _, backbone, readout, method = build(deep(name, 4))
    backbone.eval()
    backbone.model.set_attn_implementation("eager")  # CPU SDPA kernels are invisible to the counter
    batch = backbone.collate(readout, examples(backbone, readout))
    sharing = backbone.per_example_prompt_states() if per_example else contextlib.nullcontext()
    with sharing, FlopCounterMode(display=False) as counter:
        shared = method.num_tokens if backbone.runs_prompt_once(method) else 0
        backbone.output_logits(readout, method, batch)
    assert bool(shared) == (name == "tiny_llama" and not per_example)
    shape = ModelShape.from_config(backbone.model.config)
    source = batch["source_ids"].shape[1] + method.num_tokens
    target = batch["target_ids"].shape[1]
    rows = len(batch["labels"])
    analytic = backbone.forward_flops(shape, BatchSizes(rows, source, target, shared_prompt=shared))
    if backbone.family == "encoder":  # BERT's pooler and the class head are not counted analytically
        analytic += 2 * len(batch["labels"]) * shape.d * (shape.d + 2)
    # a lone shared prompt runs as a pair (causal.prompt_cache: one row takes other kernels than
    # several); the run's FLOPs count the model's work, one prompt pass, and the twin's is measured too
    twin = backbone.forward_flops(shape, BatchSizes(0, source, target, shared_prompt=shared)) if shared else 0
    assert analytic + twin == pytest.approx(counter.get_total_flops(), rel=1e-9)

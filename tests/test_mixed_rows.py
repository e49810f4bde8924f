"""One batch holding the rows of several runs (methods, prompt lengths and tasks) on one frozen
backbone gives every row exactly what it gets in its run alone: its logits, its loss and its
verbalizer scores, for the three families (the basis of packed sweeps)."""

from __future__ import annotations

import pytest
import torch

from ptlab.config.schema import to_object
from ptlab.data.examples import Example
from ptlab.methods import build_method
from ptlab.model.readout import RunParts

from conftest import compose_config
from helpers import SENTENCES, build

FAMILIES = ["tiny_t5", "tiny_llama", "tiny_bert"]
# prompt tuning of two lengths, per-layer prefixes in the input's stack, a routed mixture
METHODS = [
    ["method.prompt_length=3"],
    ["method.prompt_length=7"],
    ["method=deep_prompt", "method.prompt_length=4"],
    ["method=smop", "method.prompt_length=2", "method.num_prompts=3"],
]
T5_DECODER_PREFIXES = ["method=deep_prompt", "method.prompt_length=5", "method.stacks=[decoder]"]
TASKS = [["negative", "positive"], ["no", "yes", "maybe"]]  # two readouts, two numbers of verbalizers


def runs_on(name: str):
    """The runs of one batch, all on one backbone: (readout, method, examples) per run."""
    _, backbone, _, _ = build([f"backbone={name}", "backbone.dropout=false"])
    methods = METHODS + ([T5_DECODER_PREFIXES] if name == "tiny_t5" else [])
    runs = []
    for index, overrides in enumerate(methods):
        config = to_object(compose_config([f"backbone={name}", *overrides, f"seed={index}"]))
        verbalizers = TASKS[index % len(TASKS)]
        readout = backbone.readout(verbalizers, 64, seed=index)
        method = build_method(config.method, backbone.prompt_context(readout, index)).eval()
        texts = [f"sst2 sentence: {text}" for text in SENTENCES[index % 2 :][: 2 + index % 2]]
        ids = backbone.tokenize_sources(readout, texts)
        items = [
            Example(source_ids=row, label=(row_index + index) % len(verbalizers))
            for row_index, row in enumerate(ids)
        ]
        runs.append((readout, method, items))
    return backbone.eval(), runs


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return runs_on(request.param)


def packed(backbone, runs):
    return [RunParts(readout, method) for readout, method, _ in runs], backbone.collate_runs(
        [(readout, items) for readout, _, items in runs]
    )


def test_a_batch_of_several_runs_gives_each_row_its_logits_alone(family):
    backbone, runs = family
    parts, batch = packed(backbone, runs)
    with torch.no_grad():
        together = backbone.runs_logits(parts, batch).split(batch["run"].bincount().tolist())
        for (readout, method, items), rows in zip(runs, together):
            alone = backbone.output_logits(readout, method, backbone.collate(readout, items))
            if backbone.reads_target_tokens:  # the target positions a row has
                valid = backbone.collate(readout, items)["target_ids"] != -100
                torch.testing.assert_close(rows[:, : alone.shape[1]][valid], alone[valid], atol=1e-5, rtol=0)
            else:  # the classes a row's task has; none beyond
                torch.testing.assert_close(rows[:, : alone.shape[1]], alone, atol=1e-5, rtol=0)
                assert bool((rows[:, alone.shape[1] :] == float("-inf")).all())


def test_each_runs_loss_over_its_rows_is_its_loss_alone(family):
    backbone, runs = family
    parts, batch = packed(backbone, runs)
    with torch.no_grad():
        together = backbone.run_losses(parts, batch)
        alone = torch.stack(
            [
                backbone.loss(readout, method, backbone.collate(readout, items))
                for readout, method, items in runs
            ]
        )
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_gradients_of_the_summed_run_losses_are_each_runs_own(family):
    backbone, runs = family
    parts, batch = packed(backbone, runs)
    params = [p for readout, method, _ in runs for p in (*method.parameters(), *readout.parameters())]
    together = torch.autograd.grad(backbone.run_losses(parts, batch).sum(), params, allow_unused=True)
    alone = [
        grad
        for readout, method, items in runs
        for grad in torch.autograd.grad(
            backbone.loss(readout, method, backbone.collate(readout, items)),
            [*method.parameters(), *readout.parameters()],
            allow_unused=True,
        )
    ]
    for ours, reference in zip(together, alone):
        if reference is None:  # a parameter the pass does not reach (a prompt the router did not pick)
            assert ours is None or not ours.any()
        else:
            torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_a_batch_of_several_runs_gives_each_row_its_scores_alone(family):
    backbone, runs = family
    parts, batch = packed(backbone, runs)
    with torch.no_grad():
        together = backbone.runs_scores(parts, batch).split(batch["run"].bincount().tolist())
        for (readout, method, items), rows in zip(runs, together):
            alone = backbone.score(readout, method, backbone.collate(readout, items))
            torch.testing.assert_close(rows[:, : alone.shape[1]], alone, atol=1e-5, rtol=0)
            assert bool((rows[:, alone.shape[1] :] == float("-inf")).all())


def test_shared_prompts_of_several_runs_run_once_per_batch_on_a_causal_backbone():
    """Each run's shared prompt (PT-3, PT-7) goes through the network once per batch, one row per
    run, and its rows start from its keys and values; routed (SMoP) and per-layer (deep prompt)
    prompts stay per row. That is what makes a pack cost its runs' passes alone, not more."""
    backbone, runs = runs_on("tiny_llama")
    parts, batch = packed(backbone, runs)
    fed = []
    states = backbone.states

    def recording(cache=None, use_cache=True, **inputs):
        fed.append(tuple(inputs["inputs_embeds"].shape[:2]))
        return states(cache, use_cache, **inputs)

    backbone.states = recording
    with torch.no_grad():
        backbone.runs_logits(parts, batch)
    rows, source = batch["source_ids"].shape
    smop_tokens, targets_fed = 2, batch["target_ids"].shape[1] - 1
    assert fed == [(len(runs), 7), (rows, smop_tokens + source + targets_fed)]
    backbone.cfg.share_prompt_states = False  # the per-row pass: every block in every row's input
    fed.clear()
    with torch.no_grad():
        backbone.runs_logits(parts, batch)
    assert fed == [(rows, 7 + source + targets_fed)]

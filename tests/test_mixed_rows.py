"""One batch holding the rows of several runs (methods, prompt lengths and tasks) on one frozen
backbone gives every row exactly what it gets in its run alone: its logits, its loss and its
verbalizer scores, for the three families (the basis of packed sweeps)."""

from __future__ import annotations

import pytest
import torch

from ptlab.config.schema import to_object
from ptlab.data.examples import Example
from ptlab.methods import build_method
from ptlab.model.dropout_stream import DropoutStream
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
# methods that inject their rows together (PromptMethod.together_key): blocks of one length stacked
# whatever the method (PT-3 with SuperPos-3, PT-7 with Residual-7), SMoP runs of one shape routed
# together; three groups, so the batch is assembled from groups padded to the widest
TOGETHER = [
    ["method.prompt_length=3"],
    ["method.prompt_length=7"],
    ["method=smop", "method.prompt_length=2", "method.num_prompts=3"],
    ["method=superpos", "method.prompt_length=3"],
    ["method=smop", "method.prompt_length=2", "method.num_prompts=3", "method.noise_sigma=2.0"],
    ["method=residual", "method.prompt_length=7", "method.bottleneck=16"],
]
SETS = {"mixed": METHODS, "together": TOGETHER}
TASKS = [["negative", "positive"], ["no", "yes", "maybe"]]  # two readouts, two numbers of verbalizers


def runs_on(name: str, dropout: bool = False, methods: str = "mixed"):
    """The runs of one batch, all on one backbone: (readout, method, examples) per run."""
    _, backbone, _, _ = build([f"backbone={name}", f"backbone.dropout={str(dropout).lower()}"])
    methods = SETS[methods] + ([T5_DECODER_PREFIXES] if name == "tiny_t5" and methods == "mixed" else [])
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


@pytest.fixture(scope="module", params=[(name, methods) for name in FAMILIES for methods in SETS],
                ids=lambda param: "-".join(param))  # fmt: skip
def family(request):
    return runs_on(*request.param[:1], methods=request.param[1])


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
    backbone.config.share_prompt_states = False  # the per-row pass: every block in every row's input
    fed.clear()
    with torch.no_grad():
        backbone.runs_logits(parts, batch)
    assert fed == [(rows, 7 + source + targets_fed)]


@pytest.mark.parametrize("methods", SETS)
@pytest.mark.parametrize("name", FAMILIES)
def test_with_dropout_on_each_run_draws_its_own_masks_as_alone(name, methods):
    """The frozen network's dropout on (hidden states and attention weights): each run's masks
    are addressed by its own seed, step and pass, its rows and their real positions
    (ptlab.model.run_dropout), so its logits and gradients in a batch of several runs equal its run
    alone at the same address, whichever runs share the batch. float64, so that equality is to
    rounding; another step gives other masks. The methods train too: SMoP's router noise comes
    from each run's own generator at its own rows' shape, and ends where it ends alone."""
    backbone, runs = runs_on(name, dropout=True, methods=methods)
    backbone.double().train()
    for readout, method, _ in runs:
        readout.double(), method.double().train()
    generators = [getattr(method, "generator", None) or torch.Generator() for _, method, _ in runs]
    before = [generator.get_state() for generator in generators]

    def streams(step: int):
        return [DropoutStream(seed=10 + index, step=step) for index in range(len(runs))]

    def gradients(loss, method, readout):
        params = [*method.parameters(), *readout.parameters()]
        return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)

    _, batch = packed(backbone, runs)
    together = streams(3)
    parts = [RunParts(readout, method, dropout=stream) for (readout, method, _), stream in zip(runs, together)]
    logits = backbone.runs_logits(parts, batch).split(batch["run"].bincount().tolist())
    after = [generator.get_state() for generator in generators]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # SMoP's router noise was drawn
    for index, (readout, method, items) in enumerate(runs):
        alone = streams(3)[index]
        generators[index].set_state(before[index])
        reference = backbone.output_logits(readout, method, backbone.collate(readout, items), alone)
        assert torch.equal(generators[index].get_state(), after[index])
        mine = logits[index][:, : reference.shape[1]]
        scored = backbone.collate(readout, items)["target_ids"] != -100  # where a row has a target token
        if backbone.reads_target_tokens:
            mine, reference = mine[scored], reference[scored]
        torch.testing.assert_close(mine, reference, atol=1e-9, rtol=1e-9)
        for ours, theirs in zip(gradients(mine.sum(), method, readout), gradients(reference.sum(), method, readout)):
            if theirs is not None:
                torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=1e-9)
        assert together[index].passes == alone.passes == 1
        other = backbone.output_logits(readout, method, backbone.collate(readout, items), streams(4)[index])
        other = other[scored] if backbone.reads_target_tokens else other
        assert float((other - reference).abs().max()) > 1e-6

"""The three backbone families: prompt placement, freezing, dropout switch, scoring, batch independence."""

from __future__ import annotations

import contextlib

import pytest
import torch

from ptlab.errors import ConfigError
from ptlab.model.dropout_stream import DropoutStream
from ptlab.training.evaluate import predict, predict_examples

from helpers import build, examples

FAMILIES = ["tiny_t5", "tiny_llama", "tiny_bert"]


@pytest.mark.parametrize("name", FAMILIES)
def test_backbone_is_frozen_and_only_the_prompt_gets_gradients(name):
    _, backbone, readout, method = build([f"backbone={name}"])
    backbone.train()
    backbone.loss(readout, method, backbone.collate(readout, examples(backbone, readout)), DropoutStream(0)).backward()
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())
    assert method.prompt_embeds.grad is not None and method.prompt_embeds.grad.abs().sum() > 0


@pytest.mark.parametrize("name", FAMILIES)
def test_dropout_switch(name):
    _, on, readout, method = build([f"backbone={name}", "backbone.dropout=true"])
    _, off, _, _ = build([f"backbone={name}", "backbone.dropout=off"])
    batch = on.collate(readout, examples(on, readout))
    on.train(), off.train()
    stream = DropoutStream(0)  # each pass of a step takes the next key: other masks
    with torch.no_grad():
        assert on.loss(readout, method, batch, stream) != on.loss(readout, method, batch, stream)
        assert off.loss(readout, method, batch) == off.loss(readout, method, batch)
        off.eval()
        assert off.loss(readout, method, batch) == on.eval().loss(readout, method, batch)


@pytest.mark.parametrize("name", FAMILIES)
def test_scores_do_not_depend_on_the_other_examples_in_the_batch(name):
    _, backbone, readout, method = build([f"backbone={name}"])
    backbone.eval()
    items = examples(backbone, readout)
    with torch.no_grad():
        together = backbone.score(readout, method, backbone.collate(readout, items))
        alone = torch.cat(
            [backbone.score(readout, method, backbone.collate(readout, [item])) for item in items]
        )
    assert together.shape == (len(items), 2)
    assert torch.allclose(together, alone, atol=1e-5)


def test_seq2seq_rank_scores_equal_summed_target_log_likelihood():
    _, backbone, readout, method = build(["backbone=tiny_t5"])
    backbone.eval()
    items = examples(backbone, readout)
    batch = backbone.collate(readout, items)
    with torch.no_grad():
        scores = backbone.score(readout, method, batch)
        prompt = method.prompt_embeds
        for b, item in enumerate(items):
            ids = torch.tensor([item.source_ids])
            embeds = torch.cat([prompt[None], backbone.model.get_input_embeddings()(ids)], 1)
            for c, choice in enumerate(readout.choice_ids):
                out = backbone.model(inputs_embeds=embeds, labels=torch.tensor([choice]))
                assert scores[b, c].item() == pytest.approx(-out.loss.item() * len(choice), abs=1e-4)


def test_causal_rank_scores_equal_summed_target_log_likelihood():
    _, backbone, readout, method = build(["backbone=tiny_llama"])
    backbone.eval()
    items = examples(backbone, readout)
    with torch.no_grad():
        scores = backbone.score(readout, method, backbone.collate(readout, items))
        for b, item in enumerate(items):
            for c, choice in enumerate(readout.choice_ids):
                ids = torch.tensor([item.source_ids + choice])
                embeds = torch.cat(
                    [method.prompt_embeds[None], backbone.model.get_input_embeddings()(ids)], 1
                )
                logprobs = torch.log_softmax(backbone.model(inputs_embeds=embeds).logits[0], -1)
                start = method.num_tokens + len(item.source_ids) - 1
                expected = sum(logprobs[start + j, token] for j, token in enumerate(choice))
                assert scores[b, c].item() == pytest.approx(expected.item(), abs=1e-4)


def test_encoder_prompt_sits_after_cls():
    _, backbone, readout, method = build(["backbone=tiny_bert", "method.prompt_length=3"])
    captured = {}
    original = backbone.model.forward

    def spy(*args, **kwargs):
        captured.update(kwargs)
        return original(*args, **kwargs)

    backbone.model.forward = spy
    items = examples(backbone, readout)
    batch = backbone.collate(readout, items)
    with torch.no_grad():
        backbone.output_logits(readout, method, batch)
    embeds, mask = captured["inputs_embeds"], captured["attention_mask"]
    first = backbone.model.get_input_embeddings()(batch["source_ids"][:, :1])
    has_cls = backbone.tokenizer.cls_token_id is not None
    prompt_at = 1 if has_cls else 0
    if has_cls:
        assert torch.equal(embeds[:, :1], first)
    assert torch.equal(
        embeds[:, prompt_at : prompt_at + 3], method.prompt_embeds[None].expand(len(items), -1, -1)
    )
    assert embeds.shape[1] == batch["source_ids"].shape[1] + 3
    assert mask[:, prompt_at : prompt_at + 3].all()


def test_encoder_head_is_the_readouts_and_the_backbone_has_nothing_trainable():
    _, backbone, readout, _ = build(["backbone=tiny_bert"])
    assert not any(p.requires_grad for p in backbone.parameters())
    assert {name for name, p in readout.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


@pytest.mark.parametrize("name", ["tiny_t5", "tiny_llama"])
def test_generate_mode_maps_exact_matches_to_classes(name):
    _, backbone, readout, method = build([f"backbone={name}"])
    backbone.eval()
    batch = backbone.collate(readout, examples(backbone, readout))
    with torch.no_grad():
        texts = backbone.generate(readout, method, batch, max_new_tokens=4)
        assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
        backbone.generate = lambda *args: ["positive", " negative ", "neither", "negative"]
        assert predict(backbone, readout, method, batch, "generate", 4) == [1, 0, -1, 0]


def test_encoder_family_refuses_generation_clearly():
    _, backbone, readout, method = build(["backbone=tiny_bert"])
    with pytest.raises(ConfigError, match="eval_mode=generate"):
        backbone.generate(readout, method, backbone.collate(readout, examples(backbone, readout)), 4)


@pytest.mark.parametrize("name", FAMILIES)
def test_evaluation_is_independent_of_batch_size_and_order(name):
    config, backbone, readout, method = build([f"backbone={name}"])
    items = examples(backbone, readout) * 3

    def run(size):
        return predict_examples(
            backbone, readout, method, items, size, torch.device("cpu"), contextlib.nullcontext
        )

    backbone.eval()
    with torch.no_grad():
        expected = backbone.score(readout, method, backbone.collate(readout, items)).argmax(-1).tolist()
    assert run(1) == run(5) == expected


@pytest.mark.parametrize("method_name", ["prompt_tuning", "superpos", "residual"])
def test_causal_shared_prompt_runs_once_and_equals_the_per_example_pass(method_name):
    _, backbone, readout, method = build(
        ["backbone=tiny_llama", f"method={method_name}", "backbone.dropout=false"]
    )
    backbone.train(), method.train()
    batch = backbone.collate(readout, examples(backbone, readout))
    assert backbone.runs_prompt_once(method)
    calls = []
    hook = backbone.model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True
    )
    shared_loss = backbone.loss(readout, method, batch)
    hook.remove()
    # the prompt alone (as a pair: one row takes other kernels than several), then the batch against its cache
    assert calls == [2, len(batch["labels"])]
    shared_grads = torch.autograd.grad(shared_loss, list(method.parameters()))
    with backbone.per_example_prompt_states():
        assert not backbone.runs_prompt_once(method)
        loss = backbone.loss(readout, method, batch)
        grads = torch.autograd.grad(loss, list(method.parameters()))
        with torch.no_grad():
            per_example_scores = backbone.score(readout, method, batch)
    assert shared_loss.item() == pytest.approx(loss.item(), abs=1e-5)
    for ours, reference in zip(shared_grads, grads):
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(
            backbone.score(readout, method, batch), per_example_scores, atol=1e-5, rtol=1e-5
        )


def test_causal_prompt_is_run_per_example_when_dropout_or_routing_makes_examples_differ():
    _, backbone, _, method = build(["backbone=tiny_llama", "backbone.dropout=true"])  # attention dropout 0.1
    backbone.train()
    assert not backbone.runs_prompt_once(method)
    backbone.eval()
    assert backbone.runs_prompt_once(method)  # no dropout at evaluation
    _, backbone, _, smop = build(["backbone=tiny_llama", "method=smop"])
    assert not backbone.runs_prompt_once(smop)  # a routed prompt differs per example
    _, seq2seq, _, method = build(["backbone=tiny_t5", "backbone.dropout=false"])
    assert not seq2seq.runs_prompt_once(method)  # the encoder's prompt attends to the input


def test_prompt_state_sharing_is_auto_by_device_and_can_be_forced():
    _, backbone, _, method = build(["backbone=tiny_llama", "backbone.dropout=false"])
    backbone.eval()
    assert backbone.config.share_prompt_states is None and backbone.runs_prompt_once(method)  # CPU: on
    meta = build(["backbone=tiny_llama", "backbone.dropout=false"])[1].to("meta").eval()
    assert not meta.runs_prompt_once(method)  # auto: on for the CPU only (off on CUDA)
    meta.config.share_prompt_states = True
    assert meta.runs_prompt_once(method)
    _, forced_off, _, method = build(["backbone=tiny_llama", "backbone.share_prompt_states=false"])
    forced_off.eval()
    assert not forced_off.runs_prompt_once(method)


def test_causal_generate_equals_greedy_decoding_without_a_cache():
    _, backbone, readout, method = build(["backbone=tiny_llama"])
    backbone.eval()
    items = examples(backbone, readout)
    embed = backbone.model.get_input_embeddings()
    with torch.no_grad():
        texts = backbone.generate(readout, method, backbone.collate(readout, items), max_new_tokens=4)
        for item, text in zip(items, texts):
            generated = []
            for _ in range(4):  # [prompt][source][generated so far], positions 0.., no padding
                inputs = torch.cat(
                    [method.prompt()[None], embed(torch.tensor([item.source_ids + generated]))], 1
                )
                generated.append(int(backbone.model(inputs_embeds=inputs).logits[0, -1].argmax()))
            assert text == backbone.tokenizer.decode(generated, skip_special_tokens=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_backbone_is_built_by_the_family_its_config_names(name):
    from ptlab.model.families import registered_families

    _, backbone, _, _ = build([f"backbone={name}"])
    family = registered_families()[backbone.config.family]
    assert type(backbone) is family.backbone and backbone.family == family.name == backbone.config.family

"""SuperPos-Prompt: parameter formula, vocab-init equivalence, zero-init delta, config errors."""

from __future__ import annotations

import pytest
import torch

from ptlab.config.schema import to_object
from ptlab.errors import ConfigError

from conftest import compose_config
from helpers import build, examples


def superpos(*overrides, backbone="tiny_t5"):
    return build([f"backbone={backbone}", "method=superpos", *overrides])


@pytest.mark.parametrize("backbone", ["tiny_t5", "tiny_llama", "tiny_bert"])
@pytest.mark.parametrize("per_token", [False, True])
def test_parameter_count_formula(backbone, per_token):
    _, model, _, method = superpos(
        f"method.per_token_delta={per_token}", "method.num_vocab_samples=64", backbone=backbone
    )
    n, m, d = 10, 64, model.hidden_size
    expected = n * m + (n * d * m if per_token else d * m)
    assert sum(p.numel() for p in method.parameters() if p.requires_grad) == expected


def test_one_hot_init_starts_at_real_token_embeddings():
    _, model, _, method = superpos("method.weight_init=one_hot")
    table = model.model.get_input_embeddings().weight
    prompt = method.prompt()
    for row, weights in zip(prompt, method.weights):
        token = method.token_ids[int(weights.argmax())]
        assert torch.allclose(row, table[token], atol=1e-6)


def test_prompt_is_a_linear_superposition_without_softmax():
    _, model, _, method = superpos()
    with torch.no_grad():
        method.delta.normal_()
    table = model.model.get_input_embeddings().weight
    expected = torch.stack([(table[method.token_ids].T + method.delta) @ w for w in method.weights])
    assert torch.allclose(method.prompt(), expected, atol=1e-5)
    with torch.no_grad():  # scaling w scales the prompt: linear, no normalisation
        method.weights.mul_(3)
    assert torch.allclose(method.prompt(), 3 * expected, atol=1e-4)


def test_delta_starts_at_zero_and_receives_gradients():
    _, model, readout, method = superpos()
    assert torch.count_nonzero(method.delta) == 0
    model.loss(readout, method, model.collate(readout, examples(model, readout))).backward()
    assert method.delta.grad.abs().sum() > 0 and method.weights.grad.abs().sum() > 0


def test_sampled_ids_are_fixed_unique_and_saved():
    _, _, _, a = superpos()
    _, _, _, b = build(["backbone=tiny_t5", "method=superpos", "task=rte"], seed=5)
    assert torch.equal(a.token_ids, b.token_ids)  # same set for every task and run seed
    assert len(set(a.token_ids.tolist())) == 128
    assert {"token_ids", "frozen_embeddings", "delta", "weights"} <= set(a.state_dict())


def test_m_larger_than_the_vocabulary_is_a_clear_error():
    with pytest.raises(ConfigError, match="num_vocab_samples=5000 exceeds"):
        superpos("method.num_vocab_samples=5000")


def test_the_method_leaves_dropout_to_the_backbone_and_the_recipe_switches_it_off(caplog):
    assert to_object(compose_config(["method=superpos"])).backbone.dropout is True  # no cross-group setting
    assert to_object(compose_config(["recipe=superpos"])).backbone.dropout is False
    assert to_object(compose_config(["recipe=superpos", "backbone.dropout=true"])).backbone.dropout is True
    with caplog.at_level("WARNING", logger="ptlab"):
        superpos("backbone.dropout=true")
    assert "method=superpos is designed for backbone.dropout=false" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ptlab"):
        superpos("backbone.dropout=false")
    assert "designed for" not in caplog.text


def test_misspelled_superpos_key_is_rejected():
    with pytest.raises(Exception, match="Could not override .method.num_vocab."):
        compose_config(["method=superpos", "method.num_vocab=3"])

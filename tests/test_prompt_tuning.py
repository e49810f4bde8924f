"""Baseline prompt tuning: parameter count and the four init options."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import build


@pytest.mark.parametrize("backbone", ["tiny_t5", "tiny_llama", "tiny_bert"])
@pytest.mark.parametrize("length", [1, 20])
def test_parameter_count_is_n_times_d(backbone, length):
    _, model, _, method = build([f"backbone={backbone}", f"method.prompt_length={length}"])
    assert sum(p.numel() for p in method.parameters()) == length * model.hidden_size
    assert method(torch.zeros(3, 4, model.hidden_size), torch.ones(3, 4)).shape == (
        3,
        length,
        model.hidden_size,
    )


def test_random_init_uniform_bound_and_normal():
    _, model, _, method = build(["method.init=random", "backbone=tiny_t5", "method.prompt_length=50"])
    bound = math.sqrt(1 / model.hidden_size)
    assert method.prompt_embeds.abs().max() <= bound and method.prompt_embeds.abs().max() > 0.8 * bound
    _, _, _, normal = build(
        ["method.init=random", "method.random_dist=normal", "backbone=tiny_t5", "method.prompt_length=50"]
    )
    assert normal.prompt_embeds.std().item() == pytest.approx(1.0, abs=0.15)


def test_vocab_init_rows_are_real_non_special_token_embeddings():
    _, model, _, method = build(
        ["method.init=vocab", "backbone=tiny_t5", "method.prompt_length=10", "method.init_vocab_top=200"]
    )
    table = model.model.get_input_embeddings().weight
    special = set(model.tokenizer.all_special_ids)
    for row in method.prompt_embeds:
        matches = (table == row).all(1).nonzero().flatten().tolist()
        assert matches and matches[0] < 200 and matches[0] not in special


def test_text_init_repeats_the_text_tokens():
    _, model, _, method = build(
        ["method.init=text", "method.init_text=ab", "backbone=tiny_t5", "method.prompt_length=5"]
    )
    ids = model.tokenizer("ab", add_special_tokens=False)["input_ids"]
    expected = model.model.get_input_embeddings().weight[torch.tensor((ids * 3)[:5])]
    assert torch.equal(method.prompt_embeds.data, expected)


def test_labels_init_puts_verbalizer_tokens_first():
    _, model, _, method = build(["method.init=labels", "backbone=tiny_t5", "method.prompt_length=30"])
    ids = [
        i
        for text in ["negative", "positive"]
        for i in model.tokenizer(text, add_special_tokens=False)["input_ids"]
    ]
    table = model.model.get_input_embeddings().weight
    assert torch.equal(method.prompt_embeds.data[: len(ids)], table[torch.tensor(ids)])


def test_prompt_is_shared_by_every_example():
    _, model, _, method = build(["backbone=tiny_t5"])
    out = method(torch.randn(4, 6, model.hidden_size), torch.ones(4, 6))
    assert all(torch.equal(out[0], out[i]) for i in range(4))

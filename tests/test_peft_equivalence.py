"""ptlab's prompt-tuning forward equals HuggingFace PEFT's PromptTuningConfig forward (fp32)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PromptTuningConfig, TaskType, get_peft_model

from helpers import build, causal_target_logits, examples, seq2seq_logits


def peft_model_with(backbone, prompt: torch.Tensor, task_type: TaskType):
    # num_transformer_submodules=1: Lester et al.'s encoder-only prompt; PEFT's seq2seq default (2)
    # also prepends a second block of n rows to the decoder input.
    config = PromptTuningConfig(
        task_type=task_type, num_virtual_tokens=prompt.shape[0], num_transformer_submodules=1
    )
    model = get_peft_model(copy.deepcopy(backbone.model), config).eval()
    model.prompt_encoder.default.embedding.weight.data.copy_(prompt)
    return model


@pytest.mark.parametrize("length", [1, 5, 20])
def test_seq2seq_logits_match_peft(length):
    _, backbone, readout, method = build(
        ["backbone=tiny_t5", f"method.prompt_length={length}", "data.max_source_length=64"]
    )
    backbone.eval()
    batch = backbone.collate(readout, examples(backbone, readout))  # different lengths: right padding + mask
    peft = peft_model_with(backbone, method.prompt_embeds.detach(), TaskType.SEQ_2_SEQ_LM)
    with torch.no_grad():
        ours = backbone.output_logits(readout, method, batch)
        theirs = seq2seq_logits(peft, batch)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("length", [1, 5, 20])
def test_causal_logits_match_peft(length):
    # equal-length sources (truncated to 16 bytes) so PEFT needs no padding
    _, backbone, readout, method = build(
        ["backbone=tiny_llama", f"method.prompt_length={length}", "data.max_source_length=16"]
    )
    backbone.eval()
    batch = backbone.collate(
        readout,
        examples(backbone, readout, ["a gripping, beautifully shot film", "the plot goes nowhere at all"]),
    )
    assert bool(batch["source_mask"].all()) and bool((batch["target_ids"] != -100).all())
    peft = peft_model_with(backbone, method.prompt_embeds.detach(), TaskType.CAUSAL_LM)
    with torch.no_grad():
        ours = backbone.output_logits(readout, method, batch)
        theirs = causal_target_logits(peft, batch, length)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-5

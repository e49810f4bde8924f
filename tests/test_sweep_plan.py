"""The driver's plan of a sweep's packs: balanced over the devices, every job in one pack, and an
estimate of what fits that needs no weights."""

from __future__ import annotations

import math

import pytest
import torch

from ptlab.config.schema import to_object
from ptlab.model.families import FAMILIES
from ptlab.model.flops import ModelShape
from ptlab.model.loading import load_model_and_tokenizer, model_config
from ptlab.sweep.grouping import Group
from ptlab.sweep.plan import pack_counts, plan_packs
from ptlab.training.pack_size import MAX_AUTO_PACK, balanced, estimated_cap, member_bytes, weight_bytes

from conftest import compose_config


@pytest.mark.parametrize(
    "jobs, cap, devices, sizes",
    [
        (48, 10, 6, [8] * 6),  # not 5 packs of 10 that leave a GPU idle
        (48, 8, 4, [6] * 8),  # two rounds either way: the smaller packs
        (8, 4, 2, [4, 4]),
        (8, 4, 1, [4, 4]),
        (10, 4, 1, [4, 3, 3]),  # the fewest packs on one device, balanced
        (3, 16, 8, [1, 1, 1]),  # never an empty pack
        (9, 16, 2, [5, 4]),
    ],
)
def test_a_group_is_cut_into_balanced_packs_that_fill_the_devices(jobs, cap, devices, sizes):
    (group,) = [Group(list(range(jobs)), {})]
    packs = plan_packs([group], [cap], devices)
    assert [len(pack.jobs) for pack in packs] == sizes
    assert [job for pack in packs for job in pack.jobs] == list(range(jobs))  # each once, in order
    assert max(sizes) <= cap and math.ceil(len(packs) / devices) == math.ceil(math.ceil(jobs / cap) / devices)


def test_the_packs_added_for_idle_devices_go_to_the_group_with_the_largest_packs():
    assert pack_counts([12, 2], [16, 16], 4) == [3, 1]
    groups = [Group([0, 2, 4, 6, 8, 10], {}), Group([1, 3], {}), Group([5, 7, 9, 11], {})]
    packs = plan_packs(groups, [4, 4, 4], 6)
    assert sorted(job for pack in packs for job in pack.jobs) == list(range(12))
    assert len(packs) == 6 and all(len(pack.jobs) == 2 for pack in packs)
    assert all(set(pack.jobs) <= set(groups[pack.group].jobs) for pack in packs)


def test_balanced_keeps_order_and_sizes_within_one():
    assert balanced([5, 6, 7, 8, 9], 2) == [[5, 6, 7], [8, 9]]
    assert balanced([1, 2], 5) == [[1], [2]]


@pytest.mark.parametrize("backbone", ["tiny_t5", "tiny_llama", "tiny_bert", "minilm_l6"])
def test_the_weights_estimate_from_the_config_alone_counts_the_loaded_models_matrices(backbone):
    config = to_object(compose_config([f"backbone={backbone}"]))
    model, _ = load_model_and_tokenizer(config.backbone, FAMILIES[config.backbone.family].backbone.auto_class)
    left_out = ("position", "token_type", "pooler", "relative_attention_bias")  # tables, not matrices
    matrices = sum(
        p.numel() for name, p in model.named_parameters() if p.dim() == 2 and not any(k in name for k in left_out)
    )
    embeddings = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings() is None or (
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    )
    shape = ModelShape.from_config(model_config(config.backbone))
    estimate = weight_bytes(shape, 4) / 4
    # the estimate leaves out norms, biases and an untied output layer
    assert 0.8 * (matrices - (0 if tied else embeddings)) <= estimate <= matrices * 1.01


def test_the_cap_follows_the_memory_and_is_the_ceiling_where_nothing_is_known():
    configs = [to_object(compose_config(["backbone=tiny_t5"]))]
    assert estimated_cap(configs, None) == MAX_AUTO_PACK
    assert estimated_cap(configs, 1e12) == MAX_AUTO_PACK
    assert estimated_cap(configs, 1.0) == 1
    shape = ModelShape.from_config(model_config(configs[0].backbone))
    weights, member = weight_bytes(shape, 4), member_bytes(shape, configs[0], 4)
    for members in (1, 3, 7):
        assert estimated_cap(configs, weights + (members + 0.5) * member) == members
    gguf = [to_object(compose_config(["backbone=smollm2_135m"]))]
    assert estimated_cap(gguf, 1e12) == MAX_AUTO_PACK  # no shape without dequantizing: each pack sizes itself
    assert torch.cuda.is_available() or model_config(gguf[0].backbone) is None

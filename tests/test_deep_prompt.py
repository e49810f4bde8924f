"""method=deep_prompt (P-tuning v2 / prefix tuning): its forward equals HuggingFace PEFT's prefix
tuning given the same per-layer prefixes (T5's decoder, LLaMA), and a hand-written attention where
PEFT has no counterpart (T5's and BERT's encoder); its size is the paper's; it follows FPT's kept
layers; the FLOPs model counts its prefixes."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from peft import PrefixTuningConfig, TaskType, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.t5.modeling_t5 import T5Attention

from ptlab.config.schema import to_object
from ptlab.errors import ConfigError
from ptlab.lab.export import check_exportable
from ptlab.methods.base import sample_token_ids
from ptlab.methods.deep_prompt import table_of
from ptlab.model.anatomy import self_attentions
from ptlab.model.flops import BatchSizes, ModelShape
from ptlab.model.partial import PartialModel
from ptlab.model.prefixes import EncoderPrefixes, pass_dtype

from conftest import compose_config
from helpers import build, causal_target_logits, examples, seq2seq_logits

PREFIX = ["method=deep_prompt", "backbone.dropout=false"]


def set_layers(method, stack: str, layers) -> None:
    """Write per-layer (key, value) pairs, each [1, heads, n, head_dim], into the method's table."""
    with torch.no_grad():
        method.stacks[stack].table.copy_(table_of(layers))


def peft_prefixes(backbone, n: int, task_type: TaskType):
    """A PEFT prefix-tuning model with random prefixes, and the per-layer self-attention prefixes
    it actually uses (PEFT's seq2seq table maps its slots to decoder layers 0, 2, 4, ..., 1, 3, ...)."""
    model = get_peft_model(
        copy.deepcopy(backbone.model), PrefixTuningConfig(task_type=task_type, num_virtual_tokens=n)
    )
    model.eval()
    with torch.no_grad():
        model.prompt_encoder.default.embedding.weight.normal_(generator=torch.Generator().manual_seed(3))
        cache = model.get_prompt(1)
    cache = getattr(cache, "self_attention_cache", cache)
    return model, [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


@pytest.mark.parametrize("length", [1, 5])
def test_t5_decoder_prefixes_match_peft_prefix_tuning(length):
    _, backbone, readout, method = build(
        [*PREFIX, "backbone=tiny_t5", f"method.prompt_length={length}", "method.stacks=[decoder]"]
    )
    backbone.eval()
    batch = backbone.collate(readout, examples(backbone, readout))  # different lengths: padding + mask
    peft, layers = peft_prefixes(backbone, length, TaskType.SEQ_2_SEQ_LM)
    set_layers(method, "decoder", layers)
    with torch.no_grad():
        ours = backbone.output_logits(readout, method, batch)
        theirs = seq2seq_logits(peft, batch)
        plain = seq2seq_logits(backbone.model, batch)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-5
    # the prefix matters: without it the logits are others
    assert (ours - plain).abs().max().item() > 1e-3


@pytest.mark.parametrize("length", [1, 5])
def test_llama_prefixes_match_peft_prefix_tuning(length):
    _, backbone, readout, method = build(
        [*PREFIX, "backbone=tiny_llama", f"method.prompt_length={length}", "data.max_source_length=16"]
    )
    backbone.eval()
    batch = backbone.collate(
        readout,
        examples(backbone, readout, ["a gripping, beautifully shot film", "the plot goes nowhere at all"]),
    )
    assert bool(batch["source_mask"].all()) and bool((batch["target_ids"] != -100).all())
    peft, layers = peft_prefixes(backbone, length, TaskType.CAUSAL_LM)
    set_layers(method, "decoder", layers)
    with torch.no_grad():
        ours = backbone.output_logits(readout, method, batch)
        theirs = causal_target_logits(peft, batch)
        scores = backbone.score(readout, method, batch)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-5
    # rank scoring (prefix cache reused for every verbalizer) agrees with the teacher-forced pass
    gold = torch.log_softmax(ours, -1).gather(-1, batch["target_ids"].unsqueeze(-1)).squeeze(-1).sum(1)
    assert torch.allclose(scores[torch.arange(2), batch["labels"]], gold, atol=1e-5)


def reference_attention(module, prefix, visible, bias_module=None):
    """A hand-written self-attention over [prefix; input] (T5: unscaled, relative position bias
    with the prefix at positions 0..n-1 before the input; BERT: scaled by 1/sqrt(head_dim))."""
    key_prefix, value_prefix = prefix

    def forward(hidden_states, *args, **kwargs):
        size, length, _ = hidden_states.shape
        t5 = bias_module is not None
        q_proj, k_proj, v_proj = (
            (module.q, module.k, module.v) if t5 else (module.query, module.key, module.value)
        )
        heads = key_prefix.shape[1]

        def split(x):
            return x.view(size, length, heads, -1).transpose(1, 2)

        n = key_prefix.shape[2]
        keys = torch.cat([key_prefix.expand(size, -1, -1, -1), split(k_proj(hidden_states))], 2)
        values = torch.cat([value_prefix.expand(size, -1, -1, -1), split(v_proj(hidden_states))], 2)
        scores = split(q_proj(hidden_states)) @ keys.transpose(-1, -2)
        if t5:
            relative = torch.arange(n + length)[None, :] - torch.arange(n, n + length)[:, None]
            buckets = T5Attention._relative_position_bucket(
                relative,
                bidirectional=True,
                num_buckets=bias_module.relative_attention_num_buckets,
                max_distance=bias_module.relative_attention_max_distance,
            )
            scores = scores + bias_module.relative_attention_bias(buckets).permute(2, 0, 1)[None]
        else:
            scores = scores / keys.shape[-1] ** 0.5
        keep = torch.cat([torch.ones(size, n, dtype=torch.bool), visible.bool()], 1)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        mixed = (scores.softmax(-1) @ values).transpose(1, 2).reshape(size, length, -1)
        return (module.o(mixed), None, None) if t5 else (mixed, None)

    return forward


@pytest.mark.parametrize("backbone_name", ["tiny_t5", "tiny_bert"])
def test_encoder_prefixes_match_a_hand_written_attention(backbone_name, monkeypatch):
    _, backbone, readout, method = build([*PREFIX, f"backbone={backbone_name}", "method.prompt_length=4"])
    backbone.eval()
    batch = backbone.collate(readout, examples(backbone, readout))
    encoder = backbone.model.get_encoder() if backbone.family == "seq2seq" else backbone.model
    inputs = {"input_ids": batch["source_ids"], "attention_mask": batch["source_mask"]}
    with torch.no_grad():
        injection = method.inject(None, batch["source_mask"])
        with backbone.encoder_prefixes.placed(injection, len(batch["source_ids"])):
            ours = encoder(**inputs).last_hidden_state
        plain = encoder(**inputs).last_hidden_state  # the hooks are inactive outside the block
        attentions = self_attentions(backbone.model)["encoder"]
        for module, prefix in zip(attentions, injection.prefixes["encoder"]):
            bias = attentions[0] if backbone.family == "seq2seq" else None
            monkeypatch.setattr(
                module, "forward", reference_attention(module, prefix, batch["source_mask"], bias)
            )
        reference = encoder(**inputs).last_hidden_state
    visible = batch["source_mask"].bool()
    assert (ours - reference)[visible].abs().max().item() < 1e-5
    assert (ours - plain)[visible].abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "backbone_name,extra,stacks",
    [
        ("tiny_t5", [], {"encoder": (2, 32)}),
        ("tiny_t5", ["method.stacks=[encoder,decoder]"], {"encoder": (2, 32), "decoder": (2, 32)}),
        (
            "tiny_llama",
            ["++backbone.random_init.num_key_value_heads=1"],
            {"decoder": (2, 16)},
        ),  # grouped queries
        ("tiny_bert", [], {"encoder": (2, 32)}),
    ],
)
@pytest.mark.parametrize("reparam", [False, True])
def test_parameter_count_is_layers_x_2_x_n_x_kv_width(backbone_name, extra, stacks, reparam):
    n, h = 6, 24
    _, backbone, _, method = build(
        [*PREFIX, f"backbone={backbone_name}", f"method.prompt_length={n}", f"method.reparam={reparam}",
         f"method.reparam_hidden={h}", *extra]
    )  # fmt: skip
    d = backbone.hidden_size
    expected = 0
    for layers, kv_width in stacks.values():
        width = layers * 2 * kv_width
        expected += n * d + (d + 1) * h + (h + 1) * width if reparam else layers * 2 * n * kv_width
    assert sum(p.numel() for p in method.parameters()) == expected
    assert method.prefix_stacks == tuple(stacks) and method.num_tokens == 0


def test_the_reparameterised_prefix_exports_as_the_plain_table_it_computes():
    _, backbone, readout, method = build(
        [*PREFIX, "backbone=tiny_t5", "method.reparam=true", "method.prompt_length=3"]
    )
    _, _, readout, plain = build([*PREFIX, "backbone=tiny_t5", "method.prompt_length=3"])
    plain.load_state_dict({"stacks.encoder.table": method.export_prompt()["encoder.prefix"]})
    backbone.eval()
    batch = backbone.collate(readout, examples(backbone, readout))
    with torch.no_grad():
        assert torch.allclose(
            backbone.output_logits(readout, method, batch),
            backbone.output_logits(readout, plain, batch),
            atol=1e-6,
        )


@pytest.mark.parametrize("backbone_name", ["tiny_t5", "tiny_llama", "tiny_bert"])
def test_a_partial_model_uses_the_prefixes_of_the_layers_it_keeps(backbone_name):
    key = {"tiny_t5": "num_layers", "tiny_llama": "num_hidden_layers", "tiny_bert": "num_hidden_layers"}
    _, backbone, readout, method = build(
        [*PREFIX, f"backbone={backbone_name}", f"++backbone.random_init.{key[backbone_name]}=4"]
    )
    backbone.eval()
    partial = PartialModel(backbone.model)
    partial.set_stage(depth=0.5, width=1.0)
    assert partial.kept_layers[0] == [0, 3]
    batch = backbone.collate(readout, examples(backbone, readout))
    stack = method.prefix_stacks[0]
    table = method.stacks[stack].table
    layer_width = table.shape[1] // 4

    def logits_with_layer_changed(layer: int) -> torch.Tensor:
        changed = copy.deepcopy(method)
        with torch.no_grad():
            changed.stacks[stack].table[:, layer * layer_width : (layer + 1) * layer_width] += 1.0
            return backbone.output_logits(readout, changed, batch)

    with torch.no_grad():
        base = backbone.output_logits(readout, method, batch)
    assert torch.equal(logits_with_layer_changed(1), base)  # layer 1 is dropped: its prefix is unused
    assert (logits_with_layer_changed(3) - base).abs().max().item() > 1e-4  # layer 3 is kept at index 1


@pytest.mark.parametrize(
    "backbone_name,extra",
    [("tiny_t5", ["method.stacks=[encoder,decoder]"]), ("tiny_llama", []), ("tiny_bert", [])],
)
def test_analytic_flops_count_the_prefixes(backbone_name, extra):
    _, backbone, readout, method = build(
        [*PREFIX, f"backbone={backbone_name}", "method.prompt_length=7", *extra]
    )
    backbone.eval()
    backbone.model.set_attn_implementation("eager")  # CPU SDPA kernels are invisible to the counter
    batch = backbone.collate(readout, examples(backbone, readout))
    prefixes = method.prefix_positions
    with torch.no_grad():
        injection = method.inject(None, batch["source_mask"])
    method.inject = lambda *args: injection  # the table's reshaping is not the backbone's compute
    with FlopCounterMode(display=False) as counter:
        backbone.output_logits(readout, method, batch)
    shape = ModelShape.from_config(backbone.model.config)
    source, target = batch["source_ids"].shape[1], batch["target_ids"].shape[1]
    rows = len(batch["labels"])
    analytic = backbone.forward_flops(shape, BatchSizes(rows, source, target, prefixes=prefixes))
    if backbone.family == "encoder":  # BERT's pooler and the class head are not counted analytically
        analytic += 2 * len(batch["labels"]) * shape.d * (shape.d + 2)
    assert analytic == pytest.approx(counter.get_total_flops(), rel=1e-9)
    without = backbone.forward_flops(shape, BatchSizes(rows, source, target))
    assert analytic > without


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method.prompt_length=0"], r"method.prompt_length=0 must be >= 1"),
        (
            ["method.stacks=[middle]"],
            r"method.stacks: 'middle' is not a stack; choose from \['encoder', 'decoder'\]",
        ),
        (["method.stacks=[encoder,encoder]"], r"must name each stack once"),
        (["method.dropout=1.5"], r"method.dropout=1.5 must be in \[0, 1\)"),
        (["method.init=words"], r"method.init='words'"),
        (["method.init=activations", "method.reparam=true"], r"use one of them"),
    ],
)
def test_bad_deep_prompt_settings_are_refused_before_the_model_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        to_object(compose_config(["method=deep_prompt", *overrides]))


def test_a_stack_the_backbone_lacks_is_named():
    with pytest.raises(
        ConfigError, match=r"this backbone has no decoder stack to prefix \(it has: \['encoder'\]\)"
    ):
        build(["method=deep_prompt", "backbone=tiny_bert", "method.stacks=[decoder]"])


@pytest.mark.parametrize("backbone_name,stacks", [("tiny_llama", "[decoder]"), ("tiny_t5", "[decoder]")])
def test_generation_with_decoder_prefixes_is_refused_in_one_line(backbone_name, stacks):
    _, backbone, readout, method = build(
        ["method=deep_prompt", f"backbone={backbone_name}", f"method.stacks={stacks}"]
    )
    batch = backbone.collate(readout, examples(backbone, readout))
    with pytest.raises(ConfigError, match="trainer.eval_mode=generate is not available with prefixes"):
        backbone.generate(readout, method, batch, max_new_tokens=2)


def test_t5_generation_with_encoder_prefixes_sees_them():
    _, backbone, readout, method = build(["method=deep_prompt", "backbone=tiny_t5", "method.prompt_length=4"])
    backbone.eval()
    batch = backbone.collate(readout, examples(backbone, readout))
    with torch.no_grad(), contextlib.ExitStack():
        generated = backbone.generate(readout, method, batch, max_new_tokens=3)
    assert len(generated) == len(batch["labels"])


@pytest.mark.parametrize(
    "backbone_name,message",
    [
        ("tiny_t5", "deep prompts export for causal backbones"),
        ("tiny_bert", "the encoder family puts the prompt"),
    ],
)
def test_export_refuses_deep_prompts_that_peft_places_otherwise(backbone_name, message):
    with pytest.raises(ConfigError, match=message):
        check_exportable(to_object(compose_config(["method=deep_prompt", f"backbone={backbone_name}"])))


@pytest.mark.parametrize("backbone_name", ["tiny_t5", "tiny_llama", "tiny_bert"])
def test_under_bf16_autocast_the_prefixes_follow_the_pass_and_stay_fp32_parameters(backbone_name):
    stacks = "[encoder,decoder]" if backbone_name == "tiny_t5" else "null"
    _, backbone, readout, method = build([*PREFIX, f"backbone={backbone_name}", f"method.stacks={stacks}"])
    batch = backbone.collate(readout, examples(backbone, readout))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pass_dtype(backbone.model) == torch.bfloat16
        logits = backbone.output_logits(readout, method, batch)
        loss = backbone.loss_from_logits(logits, batch)
    loss.backward()
    full = backbone.loss(readout, method, batch)  # fp32
    assert logits.dtype == torch.bfloat16 and loss.item() == pytest.approx(full.item(), rel=0.05)
    for parameter in method.parameters():
        assert parameter.dtype == torch.float32 and torch.isfinite(parameter.grad).all()


class OlderAttention(torch.nn.Module):
    """An attention layer as transformers 5.17 wrote them: the cache is `past_key_values`."""

    layer_idx = 0

    def forward(self, hidden_states, attention_mask=None, past_key_values=None):
        keys = hidden_states.unsqueeze(1)  # [B, 1 head, L, d]
        if past_key_values is not None:
            keys, _ = past_key_values.update(keys, keys, self.layer_idx)
        return keys, attention_mask


def test_encoder_hooks_pass_the_prefix_under_the_name_the_attention_takes():
    attention = OlderAttention()
    hooks = EncoderPrefixes([attention])
    prefix = torch.full((1, 1, 3, 4), 7.0)
    hidden, mask = torch.zeros(2, 5, 4), torch.ones(2, 1, 1, 5, dtype=torch.bool)
    with hooks.placed([(prefix, prefix)], size=2, dtype=torch.float32):
        keys, widened_mask = attention(hidden, mask)  # the mask passed by position
    assert keys.shape == (2, 1, 8, 4) and bool((keys[:, :, :3] == 7).all())
    assert widened_mask.shape == (2, 1, 1, 8) and bool(widened_mask.all())
    keys, same_mask = attention(hidden, mask)  # outside `placed`: untouched
    assert keys.shape == (2, 1, 5, 4) and same_mask is mask


@pytest.mark.parametrize("share", [True, False])
def test_activations_init_on_a_causal_lm_starts_as_the_vocabulary_initialised_prompt(share):
    """A prompt attends only to itself, so its keys and values in every layer are those of its
    tokens run alone: deep prompts initialised so score exactly as prompt tuning's vocab init."""
    common = ["backbone=tiny_llama", "backbone.dropout=false", f"backbone.share_prompt_states={share}"]
    _, backbone, readout, deep = build([*common, "method=deep_prompt", "method.init=activations"])
    _, _, readout, prompt = build([*common, "method=prompt_tuning", "method.init=vocab"])
    backbone.eval()
    batch = backbone.collate(readout, examples(backbone, readout))
    with torch.no_grad():
        assert torch.allclose(
            backbone.output_logits(readout, deep, batch),
            backbone.output_logits(readout, prompt, batch),
            atol=1e-5,
        )
        assert torch.allclose(
            backbone.score(readout, deep, batch), backbone.score(readout, prompt, batch), atol=1e-5
        )


def test_activations_init_on_t5s_encoder_holds_its_first_layers_keys_of_the_tokens():
    _, backbone, readout, method = build(
        ["backbone=tiny_t5", "method=deep_prompt", "method.init=activations"]
    )
    context = backbone.prompt_context(readout, 0)
    ids = sample_token_ids(context, 20, 5000, 0)
    block = backbone.model.encoder.block[0]
    attention = block.layer[0].SelfAttention
    with torch.no_grad():
        normed = block.layer[0].layer_norm(backbone.model.shared(ids))  # [n, d]
        keys = attention.k(normed).view(20, attention.n_heads, -1)  # [n, heads, head_dim]
    table = method.stacks["encoder"].table.view(20, -1, attention.n_heads, keys.shape[-1])
    assert torch.allclose(table[:, 0], keys, atol=1e-6)  # layer 0's key slot


def test_activations_init_is_refused_for_t5s_decoder_in_one_line():
    with pytest.raises(ConfigError, match="cannot compute the decoder stack's keys and values"):
        build(
            ["backbone=tiny_t5", "method=deep_prompt", "method.init=activations", "method.stacks=[decoder]"]
        )

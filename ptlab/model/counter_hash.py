"""A counter-based hash: random bits addressed by integers, not drawn from an advancing stream.

The frozen network's dropout (ptlab/model/run_dropout.py) decides every keep/drop from the
element's address (run, step, pass, site, row, position, unit) instead of a generator's state, as
Philox in cuRAND and JAX's threefry keys do: a run's masks then do not depend on which runs share
its batch or on how many draws came before, a resume needs no generator state, and the masks of
every row of a pack come out of one set of tensor ops whatever the pack's size.

Keys (a row's, a position's, a site's units') are mixed fully by MurmurHash3's 32-bit finalizer
(`mix`, fmix32) on int32 tensors: multiplication wraps modulo 2^32 on the CPU and on CUDA alike;
right shifts of int32 are arithmetic, so each xor-shift sets the top bit to 0 (x31 ^ x31) and a
key is a 31-bit value >= 0, the same bits on every device. An element of a mask combines two such
independent keys (its row and position's, its site and unit's) with `combine`: xor, then half of
fmix32 (multiply, xor-shift, multiply), whose top bits are uniform and show no correlation between
any two units, rows, positions or sites (tests/test_addressed_dropout.py); that is 5 ops per
element where a full mix of an added key would take 9. `mix_int` and `combine_int` are the same
functions on Python ints, for keys made once per pass and for tests.
"""

from __future__ import annotations

from typing import Iterable

import torch

MASK32 = 0xFFFFFFFF


def as_int32(value: int) -> int:
    """`value` modulo 2^32 as a signed 32-bit integer (what an int32 tensor holds)."""
    value &= MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


M1 = as_int32(0x85EBCA6B)  # fmix32's multipliers
M2 = as_int32(0xC2B2AE35)
GOLDEN = as_int32(0x9E3779B9)  # 2^32 / phi: spreads consecutive counters apart before mixing


def _shift(value: int, bits: int) -> int:
    """Arithmetic right shift of a signed 32-bit value (as torch's on int32)."""
    return as_int32(value) >> bits


def mix_int(value: int) -> int:
    """fmix32 of one value, as `mix` computes it on an int32 tensor."""
    x = as_int32(value)
    x = as_int32(x ^ _shift(x, 16))
    x = as_int32(x * M1)
    x = as_int32(x ^ _shift(x, 13))
    x = as_int32(x * M2)
    return as_int32(x ^ _shift(x, 16))


def key_of(words: Iterable[int]) -> int:
    """One 32-bit key from several integers (each folded in and mixed): a run's pass address."""
    key = 0
    for word in words:
        key = mix_int(key * GOLDEN + as_int32(word))
        key = mix_int(key ^ as_int32(word >> 32))  # words wider than 32 bits (a 64-bit seed)
    return key


def mix(x: torch.Tensor) -> torch.Tensor:
    """fmix32 of every element of an int32 tensor (in place when `x` is a fresh temporary)."""
    x = x ^ (x >> 16)
    x = x.mul_(M1)
    x = x.bitwise_xor_(x >> 13)
    x = x.mul_(M2)
    return x.bitwise_xor_(x >> 16)


def combine(key: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Two independent mixed keys (broadcast) into one uniform int32 per element: compare it with
    `keep_below`."""
    x = (key ^ other).mul_(M1)
    x = x.bitwise_xor_(x >> 16)
    return x.mul_(M2)


def combine_int(key: int, other: int) -> int:
    """`combine` of one pair of keys."""
    x = as_int32((key ^ other) * M1)
    x = as_int32(x ^ _shift(x, 16))
    return as_int32(x * M2)


def counters(count: int, salt: int, device: torch.device) -> torch.Tensor:
    """`[count]` int32: mixed keys of the counters 0..count-1 under `salt` (a site's units, heads)."""
    index = torch.arange(count, dtype=torch.int32, device=device)
    return mix(index.mul_(GOLDEN).add_(as_int32(mix_int(salt))))


def keep_below(p: float) -> int:
    """Keep where a combined (uniform int32) value is below this: a probability of 1 - p."""
    return round((1.0 - p) * (1 << 32)) - (1 << 31)

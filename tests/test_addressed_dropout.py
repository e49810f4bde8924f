"""The frozen network's dropout as a pure function of its address (ptlab/model/run_dropout.py):
the hash is the one an independent computation gives, its keep decisions have the right rate and
no correlation between neighbouring addresses, a row's mask ignores its packmates and padding,
and training passes need no generator state."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from ptlab.model.counter_hash import (
    as_int32,
    combine,
    combine_int,
    counters,
    keep_below,
    key_of,
    mix,
    mix_int,
)
from ptlab.model.dropout_stream import DropoutStream
from ptlab.model.run_dropout import DropoutLayout, FrozenDropout, row_keys

P = 0.1


def fmix32_reference(value: int) -> int:
    """MurmurHash3's fmix32 on unsigned 32-bit ints, as its C source writes it, with the top bit
    cleared after each xor-shift (ptlab's int32 shifts are arithmetic: counter_hash's docstring)."""
    x = value & 0xFFFFFFFF
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, None)):
        top = x >> 31
        x = (x ^ (x >> shift) ^ (((1 << shift) - 1) << (32 - shift) if top else 0)) & 0xFFFFFFFF
        if multiplier is not None:
            x = (x * multiplier) & 0xFFFFFFFF
    return x


def test_the_tensor_hash_equals_an_independent_unsigned_computation():
    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0x9E3779B9, 987654321]
    values += torch.randint(0, 2**32, (200,), generator=torch.Generator().manual_seed(0), dtype=torch.int64).tolist()
    hashed = mix(torch.tensor([as_int32(v) for v in values], dtype=torch.int32))
    expected = [fmix32_reference(v) for v in values]
    assert [v & 0xFFFFFFFF for v in hashed.tolist()] == expected
    assert [mix_int(v) & 0xFFFFFFFF for v in values] == expected
    assert int(hashed.min()) >= 0  # a key is a 31-bit value
    pairs = torch.tensor([as_int32(v) for v in values[:100]], dtype=torch.int32), torch.tensor(
        [as_int32(v) for v in values[100:200]], dtype=torch.int32
    )
    combined = [(((a ^ b) & 0xFFFFFFFF) * 0x85EBCA6B) & 0xFFFFFFFF for a, b in zip(values[:100], values[100:200])]
    combined = [x ^ (x >> 16) ^ (0xFFFF0000 if x >> 31 else 0) for x in combined]
    combined = [as_int32(x * 0xC2B2AE35) for x in combined]
    assert combine(*pairs).tolist() == combined == [combine_int(a, b) for a, b in zip(values[:100], values[100:200])]


class Sites(nn.Module):
    """Two hidden-state dropout sites over one stack (what FrozenDropout makes of a model)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Dropout(P), nn.Dropout(P)


def layout(streams, rows_per_run, real: torch.Tensor) -> DropoutLayout:
    """A training pass's layout over `real` `[B, L]`, the rows of each run in turn."""
    owner = FrozenDropout(Sites(), lambda name: "encoder")
    run = torch.repeat_interleave(torch.arange(len(rows_per_run)), torch.tensor(rows_per_run))
    return DropoutLayout(row_keys([s.next_key() for s in streams], run), {"encoder": real}, owner)


def keeps(stream: DropoutStream, rows: int = 64, length: int = 128, units: int = 128, site: int = 1) -> torch.Tensor:
    """The keep decisions `[rows, length, units]` of one site in one pass of one run."""
    real = torch.ones(rows, length, dtype=torch.long)
    mask = layout([stream], [rows], real).hidden_keep("encoder", site, torch.zeros(rows, length, units), P)
    return mask > 0


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    assert a.numel() >= 10**6
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_the_keep_rate_is_one_minus_p_within_four_sigma():
    for p in (0.1, 0.5):
        stream = DropoutStream(seed=3)
        kept = layout([stream], [64], torch.ones(64, 128, dtype=torch.long)).hidden_keep(
            "encoder", 1, torch.zeros(64, 128, 256), p
        )
        count = kept.numel()
        rate = float((kept > 0).double().mean())
        assert abs(rate - (1 - p)) < 4 * math.sqrt(p * (1 - p) / count), (p, rate)
        assert kept.unique().tolist() == pytest.approx([0.0, 1 / (1 - p)])


def test_no_correlation_between_neighbouring_units_rows_positions_steps_or_sites():
    mask = keeps(DropoutStream(seed=5, step=7)).float()
    assert abs(correlation(mask[:, :, 1:], mask[:, :, :-1])) < 0.01  # units
    assert abs(correlation(mask[:, 1:], mask[:, :-1])) < 0.01  # positions
    assert abs(correlation(mask[1:], mask[:-1])) < 0.01  # rows
    following = keeps(DropoutStream(seed=5, step=8)).float()
    assert abs(correlation(mask, following)) < 0.01  # steps
    other_site = keeps(DropoutStream(seed=5, step=7), site=2).float()
    assert abs(correlation(mask, other_site)) < 0.01  # sites
    stream = DropoutStream(seed=5, step=7)
    first, second = keeps(stream).float(), keeps(stream).float()  # two passes of one step (micro-batches)
    assert torch.equal(first, mask) and abs(correlation(first, second)) < 0.01
    assert abs(correlation(mask, keeps(DropoutStream(seed=6, step=7)).float())) < 0.01  # runs


def test_attention_weights_have_no_correlation_between_heads_queries_or_keys():
    rows, heads, length = 16, 8, 96  # 1.2 M weights
    real = torch.ones(rows, length, dtype=torch.long)
    pass_layout = layout([DropoutStream(seed=1)], [rows], real)
    mask = pass_layout.attention_keep("encoder", 3, torch.zeros(rows, heads, length, length), None, P) > 0
    mask = mask.float()
    assert abs(float(mask.mean()) - (1 - P)) < 4 * math.sqrt(P * (1 - P) / mask.numel())
    assert abs(correlation(mask[:, 1:], mask[:, :-1])) < 0.01  # heads
    assert abs(correlation(mask[:, :, 1:], mask[:, :, :-1])) < 0.01  # queries
    assert abs(correlation(mask[..., 1:], mask[..., :-1])) < 0.01  # keys
    off_diagonal = ~torch.eye(length, dtype=torch.bool).expand_as(mask)  # (i, i) is its own transpose
    assert abs(correlation(mask[off_diagonal], mask.transpose(2, 3)[off_diagonal])) < 0.01  # (i, j) vs (j, i)


def sees(real: torch.Tensor) -> torch.Tensor:
    """A bidirectional attention mask `[B, 1, L, L]`: every query sees its row's real keys."""
    return real.bool()[:, None, None, :].expand(-1, 1, real.shape[1], -1)


def test_a_rows_mask_does_not_change_when_packmates_or_padding_are_added():
    """Run A's three rows alone (its own padding) and then behind two packmates' rows, with the
    batch padded wider and on the left: its rows' masks at their real positions are the same."""
    lengths_a = [5, 9, 7]
    alone_real = torch.tensor([[1] * n + [0] * (9 - n) for n in lengths_a])
    alone = layout([DropoutStream(seed=4, step=2)], [3], alone_real)
    mask_alone = alone.hidden_keep("encoder", 1, torch.zeros(3, 9, 16), P)
    heads_alone = alone.attention_keep("encoder", 3, torch.zeros(3, 2, 9, 9), sees(alone_real), P)
    width = 14  # the packmates' longer rows widen the batch; A's rows padded on the left
    mates = [[1] * 14, [0, 0] + [1] * 12]
    packed_real = torch.tensor(mates + [[0] * (width - n) + [1] * n for n in lengths_a])
    packed = layout([DropoutStream(seed=8, step=2), DropoutStream(seed=4, step=2)], [2, 3], packed_real)
    mask_packed = packed.hidden_keep("encoder", 1, torch.zeros(5, width, 16), P)
    heads_packed = packed.attention_keep("encoder", 3, torch.zeros(5, 2, width, width), sees(packed_real), P)
    for row, n in enumerate(lengths_a):
        assert torch.equal(mask_packed[2 + row, width - n :], mask_alone[row, :n])
        assert torch.equal(heads_packed[2 + row, :, width - n :, width - n :], heads_alone[row, :, :n, :n])


def test_a_step_s_masks_need_no_state_from_the_steps_before():
    """What a resume relies on: a stream set to a step gives that step's masks whether or not it
    made the passes of the steps before (the stream holds no generator)."""
    walked = DropoutStream(seed=2)
    for step in range(3):
        walked.at_step(step)
        keeps(walked, rows=4, length=8, units=8)
        keeps(walked, rows=4, length=8, units=8)
    walked.at_step(3)
    fresh = DropoutStream(seed=2)
    fresh.at_step(3)
    assert torch.equal(keeps(walked, rows=4, length=8, units=8), keeps(fresh, rows=4, length=8, units=8))
    assert key_of((2, 0, 3, 0)) == DropoutStream(seed=2, step=3).next_key()


def test_a_sites_op_count_does_not_depend_on_the_pack_size():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    def ops(runs: int) -> int:
        real = {"encoder": torch.ones(4 * runs, 12, dtype=torch.long)}
        owner = FrozenDropout(Sites(), lambda name: "encoder")
        run = torch.arange(runs).repeat_interleave(4)
        with Count() as count:
            pass_layout = DropoutLayout(row_keys([DropoutStream(seed=i).next_key() for i in range(runs)], run), real, owner)
            pass_layout.hidden_keep("encoder", 1, torch.zeros(4 * runs, 12, 8), P)
            pass_layout.attention_keep("encoder", 3, torch.zeros(4 * runs, 2, 12, 12), None, P)
        return count.ops

    assert ops(1) == ops(8) == ops(16)


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("PTLAB_CUDA_TESTS_ON_CPU") != "1",
    reason="needs a CUDA device (PTLAB_CUDA_TESTS_ON_CPU=1 rehearses it on the CPU)",
)
def test_the_same_address_gives_the_same_bits_on_a_gpu():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cpu = counters(4096, 17, torch.device("cpu"))
    assert torch.equal(counters(4096, 17, device).cpu(), on_cpu)
    run = torch.tensor([0, 0, 0, 1, 1])
    assert torch.equal(row_keys([key_of((1,)), key_of((2,))], run.to(device)).cpu(), row_keys([key_of((1,)), key_of((2,))], run))
    assert keep_below(0.5) == 0  # a combined value is uniform over int32: half of them are below 0

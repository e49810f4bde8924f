"""Length-grouped vs random batches on real SST-2: training throughput and padding."""

from __future__ import annotations

import contextlib

import torch

from benchkit.common import Bench, real_task, timed, train_step
from ptlab.training.devices import to_device


def length_grouping(bench: Bench) -> None:
    """Training throughput on real SST-2 batches with the default recipe's backbone and batch size:
    batches grouped by length vs plain random batches of the same epoch, timed batch by batch
    alternately, plus the padding each leaves over the whole epoch."""
    from ptlab.data.examples import epoch_batches

    args, device = bench.args, bench.device
    config, backbone, readout, method, train = real_task([], "train", device)
    backbone.train(), method.train()
    lengths = [len(example.source_ids) for example in train]
    size = config.trainer.batch_size
    batches = {
        label: epoch_batches(lengths, size, config.seed, 0, group)
        for label, group in (("grouped", True), ("plain", False))
    }
    padding = {
        label: sum(len(b) * max(lengths[i] for i in b) for b in epoch) / sum(lengths) - 1
        for label, epoch in batches.items()
    }
    optimizer = torch.optim.AdamW(list(method.parameters()) + list(readout.head.parameters()), lr=1e-3)

    def step(indices):
        batch = to_device(backbone.collate(readout, [train[i] for i in indices]), device)
        train_step(method, backbone, readout, batch, optimizer, contextlib.nullcontext)

    seconds = {"grouped": 0.0, "plain": 0.0}
    for i in range(args.grouping_batches + 1):
        for label in seconds:
            elapsed = timed(lambda indices=batches[label][i]: step(indices), bench.sync)
            seconds[label] += elapsed if i else 0.0  # the first pair warms up
    examples_s = {label: args.grouping_batches * size / value for label, value in seconds.items()}
    bench.results["length_grouping"] = {"examples_per_s": examples_s, "padding_fraction": padding}
    bench.row(
        f"minilm_l6: SST-2 train, examples/s, length-grouped vs random batches ({args.grouping_batches} each)",
        f"{examples_s['grouped']:.0f}",
        f"{examples_s['plain']:.0f}",
        f"{examples_s['grouped'] / examples_s['plain']:.2f}x",
    )
    bench.row(
        "minilm_l6: SST-2 train epoch, padding tokens per real token",
        f"{padding['grouped']:.2f}",
        f"{padding['plain']:.2f}",
    )

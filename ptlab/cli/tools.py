"""The commands that reuse a trained prompt from its run folder alone:

    ptlab-eval RUN_DIR [RUN_DIR...] [split=validation] [OVERRIDE...]   re-evaluate checkpoints/best
    ptlab-predict RUN_DIR [RUN_DIR...] --input FILE|- [--output FILE]  predict labels for new inputs
    ptlab-export RUN_DIR --format peft OUT                             a PEFT adapter folder

RUN_DIR is a run folder, or a prompt folder alone (its checkpoints/best, copied anywhere); the
positional arguments without `=` are run folders. The run's own composed config is used
(ptlab/config/saved.py); OVERRIDEs are `ptlab-train` overrides applied on top of it (`data.dir=...`,
`backbone.path=...`, `task=rte` for a task with the same verbalizers, `hardware=gpu`), and each
change is said. Several RUN_DIRs over the same backbone (and hardware settings) share one loaded
backbone and are scored together, the rows of all their prompts in one pass per batch
(mixed-prompt inference); the overrides go on each. A prompt is refused on a backbone whose
weights or tokenizer differ from those it was trained on unless `--allow-other-weights`. Every
mistake ends in one line, `ptlab: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ptlab.errors import ConfigError, check_encoding

OTHER_WEIGHTS = (
    "score even if the backbone's weights or tokenizer differ from those the prompt was trained on"
)

FOLDERS = "the arguments without '=' are run folders (several: over the same backbone), the others KEY=VALUE"


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


def run_folders(items: Sequence[str]) -> tuple[List[Path], List[str]]:
    """The positional arguments without `=` are run folders (at least one); the others KEY=VALUE."""
    folders = [Path(item) for item in items if "=" not in item]
    if not folders:
        raise ConfigError("give at least one RUN_DIR (a run folder, or its checkpoints/best)")
    return folders, [item for item in items if "=" in item]


@one_line_errors
def eval_main(argv: Optional[Sequence[str]] = None) -> None:
    """`ptlab-eval`: the best prompt's metrics on a split; printed and written to RUN_DIR/eval/.
    With several RUN_DIRs over the same backbone, one line per run, starting with its folder."""
    from ptlab.config.saved import tell
    from ptlab.files import write_text_atomically
    from ptlab.lab.saved_run import load_runs
    from ptlab.training.evaluate import evaluate_together

    usage = "%(prog)s RUN_DIR [RUN_DIR...] [split=NAME] [OVERRIDE...] [--allow-other-weights]"
    parser = argparse.ArgumentParser(prog="ptlab-eval", usage=usage, description=eval_main.__doc__)
    parser.add_argument("items", nargs="+", metavar="RUN_DIR|split=NAME|OVERRIDE", help=FOLDERS)
    parser.add_argument("--allow-other-weights", action="store_true", help=OTHER_WEIGHTS)
    args = parser.parse_intermixed_args(argv)
    run_dirs, items = run_folders(args.items)
    split, overrides = split_overrides(items, "validation")
    if split not in ("train", "validation", "test"):
        raise ConfigError(f"split={split!r} is not one of train, validation, test")
    pipelines = load_runs(run_dirs, overrides, splits=[split], allow_other_weights=args.allow_other_weights)
    for run_dir, pipeline in zip(run_dirs, pipelines):
        if split not in pipeline.data:
            where = f"{run_dir}: " if len(run_dirs) > 1 else ""
            raise ConfigError(f"{where}split={split!r}: task {pipeline.config.task.name!r} has no {split} split "
                              f"with data.split_protocol={pipeline.config.data.split_protocol}")  # fmt: skip
        pipeline.place()
        if len(run_dirs) > 1 and pipeline.config.trainer.eval_mode == "generate":
            tell(f"{run_dir}: trainer.eval_mode=generate, so it is evaluated on its own (generation does "
                 "not pack with other runs' rows)")  # fmt: skip
    for run_dir, pipeline, metrics in zip(run_dirs, pipelines, evaluate_together(pipelines, split)):
        result = {"task": pipeline.config.task.name, "split": split, "examples": len(pipeline.data[split]),
                  "overrides": overrides, "metrics": metrics}  # fmt: skip
        out = run_dir / "eval" / f"{pipeline.config.task.name}_{split}.json"
        out.parent.mkdir(exist_ok=True)
        write_text_atomically(out, json.dumps(result, indent=2))
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        line = f"{pipeline.config.task.name} {split} ({result['examples']} examples): {shown}"
        print(f"{line}\nwritten to {out}" if len(run_dirs) == 1 else f"{run_dir}  {line}  (written to {out})")


@one_line_errors
def predict_main(argv: Optional[Sequence[str]] = None) -> None:
    """`ptlab-predict`: the best prompt's prediction and every verbalizer's score for each input row.
    Each output row is the input row with `prediction` (the best verbalizer) and `scores` (every
    verbalizer's; csv/tsv: a `score_<verbalizer>` column each). With several RUN_DIRs over the same
    backbone, all their prompts are scored in one pass per batch, and each input row comes out once
    per run, the first run's rows first, each with a `run` field: the run folder as given (it
    replaces an input field of that name). A csv, tsv, jsonl, json or parquet file is read as
    training reads the task's files: its encoding (--encoding, else the run's task.local.encoding),
    a tsv without quoting, text kept as written."""
    from ptlab.data.tasks import template_fields
    from ptlab.lab.predict import check_fields, read_rows, runs_predictions
    from ptlab.lab.saved_run import load_runs, saved_config

    args = predict_parser().parse_intermixed_args(argv)
    run_dirs, overrides = run_folders(args.items)
    configs = [saved_config(run_dir, overrides) for run_dir in run_dirs]
    several = len(run_dirs) > 1
    fields = [template_fields(config.task.template) for config in configs]
    whose = [f": {run_dir}'s task {config.task.name!r} reads {needs}" if several else ""
             for run_dir, config, needs in zip(run_dirs, configs, fields)]  # fmt: skip
    encoding = args.encoding or configs[0].task.local.encoding
    check_encoding("--encoding", encoding)
    rows = read_rows(args.input, fields[0], encoding, whose=whose[0])  # bad input fails before the model loads
    for needs, run in zip(fields[1:], whose[1:]):
        check_fields(rows, needs, args.input, run)
    pipelines = load_runs(run_dirs, splits=(), allow_other_weights=args.allow_other_weights, configs=configs)
    for pipeline in pipelines:
        pipeline.place()
    per_run = runs_predictions(pipelines, rows, args.batch_size)
    if several:
        predictions = [
            {"run": str(run_dir), **{key: value for key, value in row.items() if key != "run"}}
            for run_dir, run_rows in zip(run_dirs, per_run)
            for row in run_rows
        ]
    else:
        predictions = per_run[0]
    emit_predictions(predictions, args.output, args.format)


def predict_parser() -> argparse.ArgumentParser:
    """ptlab-predict's command line."""
    usage = "%(prog)s RUN_DIR [RUN_DIR...] --input FILE|- [--output FILE] [--format ...] [OVERRIDE...]"
    parser = argparse.ArgumentParser(prog="ptlab-predict", usage=usage, description=predict_main.__doc__)
    parser.add_argument(
        "--input", required=True, metavar="FILE|-", help="jsonl, json, csv, tsv, parquet or text lines"
    )
    parser.add_argument(
        "--encoding", help="the input file's text encoding (default: the run's task.local.encoding)"
    )
    parser.add_argument("--output", metavar="FILE", help="default: stdout")
    parser.add_argument(
        "--format", choices=("jsonl", "csv", "tsv"), help="default: the output's suffix, else jsonl"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--allow-other-weights", action="store_true", help=OTHER_WEIGHTS)
    parser.add_argument("items", nargs="+", metavar="RUN_DIR|OVERRIDE", help=FOLDERS)
    return parser


def emit_predictions(predictions: List[Dict[str, Any]], output: Optional[str], fmt: Optional[str]) -> None:
    """The predictions written to `output` (atomically; None: stdout) as `fmt` (None: the output's
    suffix, else jsonl)."""
    from ptlab.files import write_file_atomically
    from ptlab.lab.predict import write_predictions

    fmt = fmt or (Path(output).suffix.lstrip(".") if output else "jsonl")
    fmt = fmt if fmt in ("jsonl", "csv", "tsv") else "jsonl"
    if output:

        def write(path: Path) -> None:
            with open(path, "w", newline="", encoding="utf-8") as out:
                write_predictions(predictions, out, fmt)

        write_file_atomically(Path(output), write)
        print(f"{len(predictions)} predictions written to {output}", file=sys.stderr)
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

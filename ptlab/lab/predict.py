"""A trained prompt's predictions for new inputs: rows in (jsonl, json, csv, tsv, parquet, or plain
text lines for single-text tasks), the predicted verbalizer and every verbalizer's score out.
Several runs on one shared backbone are predicted together, their prompts scored in one pass per
batch."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO

import torch

from ptlab.config.schema import LOCAL_FORMATS
from ptlab.data.examples import Example, check_decodes, read_table
from ptlab.data.tasks import render_source
from ptlab.errors import ConfigError
from ptlab.model.readout import RunParts
from ptlab.training.build import Pipeline
from ptlab.training.evaluate import runs_scores


def text_format(name: str, text: str) -> str:
    """Stdin's or a text file's rows: plain text lines for a `.txt` file, else JSON lines if it
    starts with `{`."""
    if Path(name).suffix.lower() == ".txt":
        return "text"
    return "jsonl" if text.lstrip().startswith("{") else "text"


def parse_rows(text: str, fmt: str, fields: List[str], source: str) -> List[Dict[str, Any]]:
    """Rows from stdin or a text file: one per non-empty line, as text (single-field tasks) or JSON."""
    if fmt == "text":
        if len(fields) != 1:
            raise ConfigError(
                f"{source}: plain text lines fit a task with one input field; this template needs "
                f"{fields}: give jsonl, csv or tsv rows with those fields"
            )
        return [{fields[0]: line} for line in text.splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as error:
                raise ConfigError(f"{source}, line {number}: not a JSON object ({error})") from None
    return rows


def read_rows(
    source: str, fields: List[str], encoding: str, stdin: Optional[TextIO] = None, whose: str = ""
) -> List[Dict[str, Any]]:
    """Rows holding the template's `fields`; `source` is a file path or `-` for stdin; `whose`
    names the run whose template it is in the error (several runs predicted together). A csv, tsv,
    jsonl, json or parquet file is read as training reads a task's files (`read_table`: the
    `encoding`, a tsv without quoting, text kept as written); stdin and other files by line."""
    if source == "-":
        text = (stdin or sys.stdin).read()
        rows = parse_rows(text, text_format(source, text), fields, "stdin")
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"--input {source}: no such file")
        fmt = path.suffix.lower().lstrip(".")
        if path.stat().st_size == 0:
            rows = []
        elif fmt in LOCAL_FORMATS:
            rows = read_table(path, fmt, encoding, setting="--encoding").to_list()
        else:
            check_decodes(path, encoding, setting="--encoding")
            text = path.read_text(encoding=encoding)
            rows = parse_rows(text, text_format(source, text), fields, source)
    if not rows:
        raise ConfigError(f"--input {source}: no rows")
    check_fields(rows, fields, source, whose)
    return rows


def check_fields(rows: List[Dict[str, Any]], fields: List[str], source: str, whose: str = "") -> None:
    """Every row holds each of `fields` (a template's); `whose`: the run it is checked for."""
    for number, row in enumerate(rows, 1):  # a table's row lacking a field holds None there
        missing = [f for f in fields if not isinstance(row, dict) or row.get(f) is None]
        if missing:
            have = (
                sorted(key for key, value in row.items() if value is not None)
                if isinstance(row, dict)
                else type(row).__name__
            )
            raise ConfigError(
                f"--input {source}, row {number}: no field {missing[0]!r} (it has {have}){whose}"
            )


def predict_rows(
    pipeline: Pipeline, rows: List[Dict[str, Any]], batch_size: int = 32
) -> List[Dict[str, Any]]:
    """Each row with `prediction` (the best verbalizer) and `scores` (every verbalizer's score:
    log-likelihood for generative backbones, the head's logit for the encoder family)."""
    return runs_predictions([pipeline], rows, batch_size)[0]


def runs_predictions(
    pipelines: Sequence[Pipeline], rows: List[Dict[str, Any]], batch_size: int = 32
) -> List[List[Dict[str, Any]]]:
    """Each pipeline's `predict_rows` for `rows`: pipelines on one shared backbone (`load_runs`),
    their prompts scored together, the rows of several runs in one pass per batch."""
    backbone = pipelines[0].backbone
    if any(pipeline.backbone is not backbone for pipeline in pipelines):
        raise ValueError("runs predicted together must share one backbone (ptlab.lab.saved_run.load_runs)")
    runs = []
    for pipeline in pipelines:
        sources = [render_source(pipeline.config.task, row) for row in rows]
        ids = backbone.tokenize_sources(pipeline.readout, sources)
        runs.append(
            (RunParts(pipeline.readout, pipeline.method), [Example(source_ids=row, label=0) for row in ids])
        )
    first = pipelines[0]
    scores = runs_scores(backbone, runs, batch_size, first.device, first.autocast)
    predictions = []
    for pipeline, run_scores in zip(pipelines, scores):
        verbalizers = list(pipeline.config.task.verbalizers)
        predictions.append([
            {**row, "prediction": verbalizers[int(torch.argmax(s))], "scores": dict(zip(verbalizers, s.tolist()))}
            for row, s in zip(rows, run_scores)
        ])  # fmt: skip
    return predictions


def write_predictions(predictions: List[Dict[str, Any]], out: TextIO, fmt: str) -> None:
    if fmt == "jsonl":
        for row in predictions:
            out.write(json.dumps(row) + "\n")
        return
    flat = [{**{k: v for k, v in row.items() if k != "scores"},
             **{f"score_{name}": value for name, value in row["scores"].items()}} for row in predictions]  # fmt: skip
    columns = list(dict.fromkeys(key for row in flat for key in row))  # runs of other tasks: other scores
    writer = csv.DictWriter(out, fieldnames=columns, delimiter="\t" if fmt == "tsv" else ",")
    writer.writeheader()
    writer.writerows(flat)

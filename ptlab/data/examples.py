"""Load a task's splits (local official files first, then the hub), tokenize once, and batch.

Resolution order: `data.dir` (or $PTLAB_DATA_DIR) holding the task's official files, then the
HuggingFace hub. If neither works the error lists the files to place and where.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, load_dataset

from ptlab.config.schema import LOCAL_FORMATS, DataConfig, TaskConfig, TrainerConfig
from ptlab.data.tasks import label_index, preprocessor, render_source, template_fields
from ptlab.data.token_cache import cached_tokenize
from ptlab.errors import ConfigError

log = logging.getLogger(__name__)

TSV_OPTIONS = dict(delimiter="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, na_filter=False)
HELD_OUT_SEED = 42  # one train/validation partition for every run and seed of a sweep
LOADERS = {
    "jsonl": "json",
    "json": "json",
    "csv": "csv",
    "tsv": "csv",
    "parquet": "parquet",
}  # datasets' builders


def _candidates(name: str, data_dir: Optional[str]) -> List[Path]:
    """Where a task file may be: as given when absolute, else under data.dir, then the working directory."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return [path]
    return [*([Path(data_dir).expanduser() / path] if data_dir else []), Path.cwd() / path]


def _local_files(task: TaskConfig, data_dir: Optional[str]) -> Optional[Dict[str, Path]]:
    """The task's local files by split, or None when a named file is found nowhere (the hub's turn)."""
    if task.local.train is None:
        return None
    names = {"train": task.local.train, "validation": task.local.validation}
    files = {}
    for split, name in names.items():
        if name is None:
            continue
        candidates = _candidates(name, data_dir)
        for path in candidates:
            if path.exists() and not path.is_file():
                raise ConfigError(f"{path}: not a file (task.local.{split} of task {task.name!r}): name the "
                                  f"{split} file itself")  # fmt: skip
            if path.is_file() and not os.access(path, os.R_OK):
                raise ConfigError(f"{path}: cannot be read (permission denied): give ptlab read access, "
                                  "or copy the file and point data.dir at the copy")  # fmt: skip
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            return None
        files[split] = found
    return files


def check_decodes(path: Path, encoding: str, setting: str = "task.local.encoding") -> None:
    """Name the first byte the file's encoding cannot decode, and the setting that reads it."""
    data = path.read_bytes()
    try:
        data.decode(encoding)
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: byte {error.start} (0x{data[error.start]:02x}) is not valid {encoding} ({error.reason}): "
            f"name the file's encoding, e.g. {setting}=latin-1 (or cp1252 for a Windows export)"
        ) from None


def _check_jsonl(path: Path, encoding: str) -> None:
    """Name the first line that is not a JSON object (a line cut short, a stray character)."""
    with open(path, encoding=encoding) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise ConfigError(
                    f"{path}, line {number}: not valid JSON ({error}): repair or remove the line"
                ) from None
            if not isinstance(row, dict):
                raise ConfigError(
                    f"{path}, line {number}: a JSON {type(row).__name__}, not an object with fields"
                )


def file_format(task: TaskConfig, path: Path) -> str:
    """`task.local.format`, else the file's extension."""
    fmt = task.local.format or path.suffix.lower().lstrip(".")
    if fmt not in LOCAL_FORMATS:
        raise ConfigError(f"{path}: cannot tell its format from the extension {path.suffix!r}: set "
                          f"task.local.format to one of {list(LOCAL_FORMATS)}")  # fmt: skip
    return fmt


def read_table(
    path: Path,
    fmt: str,
    encoding: str,
    column_names: Optional[List[str]] = None,
    setting: str = "task.local.encoding",
) -> Dataset:
    """One file of rows through `datasets`' own loaders (csv/tsv by pandas, json lines or a JSON list
    by pyarrow, parquet); text is kept as written ("NA" stays "NA"), a tsv is read without quoting.
    What a task's files are read with, and ptlab-predict's --input files, so both give the same rows;
    `setting` is what the decoding error names as the fix."""
    options: Dict[str, Any] = {}
    if fmt != "parquet":  # a binary format: no text encoding
        check_decodes(path, encoding, setting)
        options["encoding"] = encoding
    if fmt == "jsonl":
        _check_jsonl(path, encoding)
    if fmt in ("csv", "tsv"):
        options.update(TSV_OPTIONS if fmt == "tsv" else {"keep_default_na": False, "na_filter": False})
        if column_names:
            options["column_names"] = list(column_names)
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # ptlab says what it reads; a bar would be stray lines on stderr
    try:
        return load_dataset(LOADERS[fmt], data_files=str(path), split="train", **options)
    except Exception as error:  # the loaders' own words (pandas: "Expected 2 fields in line 7, saw 3")
        cause = error.__cause__ or error
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(f"{path} cannot be read as {fmt}: {reason}") from None
    finally:
        if shown:
            datasets.enable_progress_bars()


def _read_file(task: TaskConfig, path: Path) -> Dataset:
    if path.stat().st_size == 0:
        raise ConfigError(f"{path} is empty: give the task's file with its rows (task.local)")
    return read_table(path, file_format(task, path), task.local.encoding, task.local.column_names)


def _load_local(task: TaskConfig, files: Dict[str, Path]) -> DatasetDict:
    splits = DatasetDict({split: _read_file(task, path) for split, path in files.items()})
    if task.local.rename:
        splits = splits.rename_columns(dict(task.local.rename))
    return splits


def check_rows(rows: Dataset, task: TaskConfig, where: str) -> None:
    """Every row of a split must fill the template and carry a label the task knows, before any
    model loads: the error names the file (or hub split), the row and the field."""
    if len(rows) == 0:
        raise ConfigError(f"{where} has no rows")
    columns = set(rows.column_names)
    needed = [*template_fields(task.template), task.label_field]
    for name in needed:
        if name not in columns:
            raise ConfigError(
                f"{where}: no field {name!r} in its rows (they have {sorted(columns)}): fix task.template, "
                "task.label_field or task.local.rename"
            )
    table = rows.with_format("arrow")
    for name in needed:
        column = table[name]
        empty = column.is_null()
        if name == task.label_field and column.type in (pa.string(), pa.large_string()):
            empty = pc.or_kleene(empty, pc.equal(column, "")).fill_null(False)
        first = pc.index(empty, True).as_py()
        if first >= 0:
            raise ConfigError(f"{where}, row {first + 1}: field {name!r} is empty")
    labels = table[task.label_field]
    bad = {}  # first row of each label the task does not know, checked once per distinct value
    for raw in pc.unique(labels).to_pylist():
        try:
            label_index(task, raw)
        except ConfigError as error:
            bad[_first_row(labels, raw)] = error
    if bad:
        first = min(bad)
        raise ConfigError(f"{where}, row {first + 1}: {bad[first]}") from None


def _first_row(column: pa.ChunkedArray, value: Any) -> int:
    """Index of `value`'s first row; NaN, which equals nothing, found as NaN."""
    if value != value:
        return pc.index(pc.is_nan(column), True).as_py()
    return pc.index(column, value).as_py()


def _load_hub(task: TaskConfig) -> DatasetDict:
    loaded = load_dataset(task.hub.path, task.hub.name)
    return DatasetDict(train=loaded[task.hub.train], validation=loaded[task.hub.validation])


def load_raw_splits(task: TaskConfig, data: DataConfig) -> DatasetDict:
    """The task's train and validation rows, from local files or the hub, every row checked; with
    no validation file, a stratified `data.validation_fraction` of the train file (fixed seed, so a
    resumed run and every run of a sweep hold out the same rows)."""
    files = _local_files(task, data.dir)
    if files is not None:
        log.info("task %s: local files %s", task.name, {k: str(v) for k, v in files.items()})
        splits = _load_local(task, files)
    else:
        splits = _load_hub_or_explain(task, data)
    reshape = preprocessor(task)
    if reshape is not None:
        splits = splits.map(reshape, batched=True, remove_columns=splits["train"].column_names)
    for split, rows in splits.items():
        check_rows(
            rows, task, str(files[split]) if files is not None else f"the hub's {task.name} {split} split"
        )
    if "validation" not in splits:
        splits = _split_for_validation(splits["train"], task, data.validation_fraction, seed=HELD_OUT_SEED)
        log.info("task %s: no validation file; held out %d of the %d rows of %s as validation (stratified, "
                 "data.validation_fraction=%s)", task.name, len(splits["validation"]),
                 len(splits["train"]) + len(splits["validation"]), files["train"], data.validation_fraction)  # fmt: skip
    return splits


def _load_hub_or_explain(task: TaskConfig, data: DataConfig) -> DatasetDict:
    hub_error = "no hub dataset configured"
    if task.hub.path:
        try:
            return _load_hub(task)
        except Exception as error:  # offline, unknown dataset, network down: all say the same
            hub_error = str(error).splitlines()[0] if str(error) else type(error).__name__
    if task.local.train is None:
        where = "no local files named (task.local.train)"
    else:
        names = [name for name in (task.local.train, task.local.validation) if name]
        looked = ", ".join(str(path) for name in names for path in _candidates(name, data.dir))
        where = f"looked for {', '.join(names)} at {looked} (data.dir={data.dir!r}; set data.dir=... or PTLAB_DATA_DIR)"
    raise ConfigError(
        f"task {task.name!r}: no data. {where}; or let the hub answer for {task.hub.path!r}/{task.hub.name!r} "
        f"({hub_error})."
    )


@dataclass
class Example:
    """A tokenized example: what every backbone family's collate function consumes."""

    source_ids: List[int]
    label: int
    group: Optional[str] = None
    target_value: Optional[float] = None


class TaskData:
    """Tokenized splits of one task for one backbone: `train`, `validation` and maybe `test`."""

    def __init__(self, splits: Dict[str, List[Example]]) -> None:
        self.splits = splits

    def __getitem__(self, split: str) -> List[Example]:
        return self.splits[split]

    def __contains__(self, split: str) -> bool:
        return split in self.splits

    def digest(self) -> str:
        """Names the exact rows of every split (their tokens and labels): a resumed run checks that
        it trains and validates on what its checkpoint did (a held-out split, an edited file)."""
        hasher = hashlib.sha256()
        for name in sorted(self.splits):
            for example in self.splits[name]:
                hasher.update(f"{name}|{example.label}|{example.source_ids}\n".encode())
        return hasher.hexdigest()[:16]


def _subsample(rows: Dataset, limit: Optional[int], seed: int) -> Dataset:
    if limit is None or limit >= len(rows):
        return rows
    return rows.shuffle(seed=seed).select(range(limit))


def _split_for_validation(rows: Dataset, task: TaskConfig, fraction: float, seed: int) -> DatasetDict:
    """SMoP's protocol: hold out `fraction` of train as validation, stratified by label (or by
    whole question for grouped tasks such as MultiRC, so no question straddles the split)."""
    rng = random.Random(seed)
    if "group" in rows.column_names:
        groups = sorted(set(rows["group"]))
        rng.shuffle(groups)
        held = set(groups[: max(1, round(fraction * len(groups)))])
        val_idx = [i for i, group in enumerate(rows["group"]) if group in held]
    else:
        by_label: Dict[int, List[int]] = {}
        for i, raw in enumerate(rows[task.label_field]):
            by_label.setdefault(label_index(task, raw), []).append(i)
        val_idx = []
        for indices in by_label.values():
            rng.shuffle(indices)
            val_idx += indices[: max(1, round(fraction * len(indices)))]
    held_out = set(val_idx)
    train_idx = [i for i in range(len(rows)) if i not in held_out]
    return DatasetDict(train=rows.select(train_idx), validation=rows.select(sorted(val_idx)))


def split_rows(raw: DatasetDict, task: TaskConfig, data: DataConfig, seed: int) -> Dict[str, Dataset]:
    """Apply `data.split_protocol` and the example limits; the split itself uses a fixed seed so
    every run of a sweep sees the same train/validation partition."""
    if data.split_protocol == "smop":
        held = _split_for_validation(raw["train"], task, data.validation_fraction, seed=HELD_OUT_SEED)
        splits = {"train": held["train"], "validation": held["validation"], "test": raw["validation"]}
    else:
        splits = {"train": raw["train"], "validation": raw["validation"]}
    splits["train"] = _subsample(splits["train"], data.max_train_examples, seed)
    for name in ("validation", "test"):
        if name in splits:
            splits[name] = _subsample(splits[name], data.max_eval_examples, 1234)
    return splits


def tokenize_splits(
    splits: Dict[str, Dataset],
    task: TaskConfig,
    tokenize_sources: Callable[[List[str]], List[List[int]]],
    max_length: int,
    cache_identity: Optional[str] = None,
) -> TaskData:
    """Render every row's template and tokenize each split once, in one batched call (or load it
    from the disk cache when `cache_identity` names the tokenizer); warns when truncation at
    `max_length` cuts many inputs (their ends, e.g. a question, would be lost)."""
    tokenized = {}
    for name, rows in splits.items():
        records = rows.to_list()
        texts = [render_source(task, row) for row in records]
        if cache_identity is None:
            sources = tokenize_sources(texts)
        else:
            sources = cached_tokenize(texts, tokenize_sources, cache_identity, max_length)
        cut = sum(len(ids) >= max_length for ids in sources) / max(len(sources), 1)
        if cut > 0.05:
            log.warning(
                "task %s: %.0f%% of %s inputs are truncated at data.max_source_length=%d; raise it to keep their ends",
                task.name,
                100 * cut,
                name,
                max_length,
            )
        tokenized[name] = [
            Example(
                source_ids=ids,
                label=label_index(task, row[task.label_field]),
                group=row.get("group"),
                target_value=row.get("target_value"),
            )
            for ids, row in zip(sources, records)
        ]
        log.info("task %s: %s has %d examples", task.name, name, len(records))
    return TaskData(tokenized)


def epoch_order(num_examples: int, seed: int, epoch: int) -> List[int]:
    """The example order of one epoch: a function of (seed, epoch) only, so a resumed run
    replays exactly the batches an uninterrupted run would see."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def chunks(items: List, size: int) -> Iterator[List]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class DataPosition(Protocol):
    """Where a run is in its data: what a checkpoint saves so a resumed run continues there."""

    epoch: int
    batch_in_epoch: int


MEGABATCH = 50  # batches per length-sorted pool, as in transformers' LengthGroupedSampler


def epoch_batches(
    lengths: List[int], batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> List[List[int]]:
    """The index batches of one epoch, a function of (seed, epoch) only. Grouped by length, each
    pool of `MEGABATCH` random batches is sorted by length before it is cut, so a batch pads to
    nearly its own length; the batches are then shuffled so the loss sees no length ramp."""
    order = epoch_order(len(lengths), seed, epoch)
    if not group_by_length:
        return list(chunks(order, batch_size))
    batches = []
    for pool in chunks(order, batch_size * MEGABATCH):
        batches += chunks(sorted(pool, key=lambda i: -lengths[i]), batch_size)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def training_batches(
    lengths: List[int], config: TrainerConfig, seed: int, position: DataPosition
) -> Iterator[List[int]]:
    """Endless stream of training index batches from `position` on, which it advances. Batches
    are drawn per optimizer step and then split into micro-batches, so an optimizer step sees the
    same examples whatever `grad_accum` is."""
    step_size = config.batch_size * config.grad_accum
    while True:
        steps = epoch_batches(lengths, step_size, seed, position.epoch, config.group_by_length)
        batches = [batch for step in steps for batch in chunks(step, config.batch_size)]
        while position.batch_in_epoch < len(batches):
            indices = batches[position.batch_in_epoch]
            position.batch_in_epoch += 1
            yield indices
        position.epoch += 1
        position.batch_in_epoch = 0

"""A user's own task data: csv, tsv with a header, jsonl, json and parquet files, one per split or
one in all (a stratified held-out validation split), found under data.dir, the working directory
or at an absolute path."""

from __future__ import annotations

import json
from collections import Counter

import pandas as pd
import pytest

from ptlab.config.schema import to_object
from ptlab.data.examples import load_raw_splits, split_rows
from ptlab.errors import ConfigError

from conftest import compose_config

TOPICS = ["sport", "weather", "politics"]
ROWS = [{"text": f"headline number {i}, {'a' * (i % 5)}", "topic": TOPICS[i % 3]} for i in range(60)]


def write(path, rows, fmt):
    """The rows in a file of the format, written by pandas / json, not by ptlab."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        frame.to_parquet(path)
    return path


def topics_task(*overrides):
    """A three-class task on the rows' own labels: no label_map (the labels are the verbalizers)."""
    base = ["task=sst2", "task.name=topics", "task.template='{text}'", f"task.verbalizers=[{','.join(TOPICS)}]",
            "task.label_field=topic", "task.label_map={}", "task.local.rename={}", "task.local.format=null", "task.hub.path=null"]  # fmt: skip
    return to_object(compose_config([*base, *overrides]))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json", "parquet"])
def test_every_format_loads_the_same_rows_one_file_per_split(tmp_path, fmt):
    write(tmp_path / f"train.{fmt}", ROWS[:45], fmt)
    write(tmp_path / f"valid.{fmt}", ROWS[45:], fmt)
    config = topics_task(f"data.dir={tmp_path}", f"task.local.train=train.{fmt}", f"task.local.validation=valid.{fmt}")  # fmt: skip
    splits = load_raw_splits(config.task, config.data)
    assert splits["train"]["text"] == [row["text"] for row in ROWS[:45]]
    assert splits["validation"]["topic"] == [row["topic"] for row in ROWS[45:]]


def test_one_file_holds_out_a_stratified_seeded_validation_split(tmp_path, caplog):
    write(tmp_path / "all.csv", ROWS, "csv")
    config = topics_task(f"data.dir={tmp_path}", "task.local.train=all.csv", "task.local.validation=null",
                         "data.validation_fraction=0.2")  # fmt: skip
    caplog.set_level("INFO")
    first = load_raw_splits(config.task, config.data)
    again = load_raw_splits(config.task, config.data)  # a resumed run, another seed of the sweep
    assert first["validation"]["text"] == again["validation"]["text"]
    assert Counter(first["validation"]["topic"]) == {"sport": 4, "weather": 4, "politics": 4}
    assert len(first["train"]) == 48 and not set(first["train"]["text"]) & set(first["validation"]["text"])
    assert "held out 12 of the 60 rows of" in caplog.text and "data.validation_fraction=0.2" in caplog.text


def test_paths_under_data_dir_the_working_directory_or_absolute(tmp_path, monkeypatch):
    write(tmp_path / "data" / "t.jsonl", ROWS, "jsonl")
    write(tmp_path / "work" / "rel" / "t.jsonl", ROWS[:30], "jsonl")
    monkeypatch.chdir(tmp_path / "work")
    rows = {}
    for name, data_dir, train in [
        ("data.dir", tmp_path / "data", "t.jsonl"),
        ("cwd", None, "rel/t.jsonl"),
        ("absolute", tmp_path / "elsewhere", str(tmp_path / "data" / "t.jsonl")),
    ]:
        config = topics_task(
            f"data.dir={data_dir or 'null'}", f"task.local.train={train}", "task.local.validation=null"
        )
        rows[name] = len(load_raw_splits(config.task, config.data)["train"])
    assert rows == {"data.dir": 54, "cwd": 27, "absolute": 54}
    config = topics_task(
        f"data.dir={tmp_path / 'data'}", "task.local.train=missing.csv", "task.local.validation=null"
    )
    with pytest.raises(
        ConfigError, match=r"no data. looked for missing.csv at .*data/missing.csv, .*work/missing.csv"
    ):
        load_raw_splits(config.task, config.data)


def test_a_file_whose_format_cannot_be_told_is_named(tmp_path):
    write(tmp_path / "rows.txt", ROWS, "csv")
    config = topics_task(f"data.dir={tmp_path}", "task.local.train=rows.txt", "task.local.validation=null")  # fmt: skip
    with pytest.raises(
        ConfigError,
        match=r"rows.txt: cannot tell its format from the extension '.txt': set task.local.format",
    ):
        load_raw_splits(config.task, config.data)
    config = topics_task(f"data.dir={tmp_path}", "task.local.train=rows.txt", "task.local.validation=null",
                         "task.local.format=csv")  # fmt: skip
    assert len(load_raw_splits(config.task, config.data)["train"]) == 54


def test_smop_protocol_on_one_file_tests_on_the_held_out_rows(tmp_path):
    write(tmp_path / "all.jsonl", ROWS, "jsonl")
    config = topics_task(f"data.dir={tmp_path}", "task.local.train=all.jsonl", "task.local.validation=null",
                         "data.split_protocol=smop")  # fmt: skip
    splits = split_rows(load_raw_splits(config.task, config.data), config.task, config.data, seed=0)
    assert {name: len(rows) for name, rows in splits.items()} == {"train": 48, "validation": 6, "test": 6}
    texts = [set(rows["text"]) for rows in splits.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])


ACCENTED = [{"text": f"café número {i} à la carte", "topic": TOPICS[i % 3]} for i in range(30)]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_a_latin1_file_is_one_line_naming_the_byte_and_reads_with_its_encoding(tmp_path, fmt):
    path = tmp_path / f"tweets.{fmt}"
    if fmt == "jsonl":
        path.write_bytes(
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ACCENTED).encode("latin-1")
        )
    else:
        pd.DataFrame(ACCENTED).to_csv(
            path, index=False, sep="\t" if fmt == "tsv" else ",", encoding="latin-1"
        )
    first = path.read_bytes().index("é".encode("latin-1"))
    files = [f"data.dir={tmp_path}", f"task.local.train={path.name}", "task.local.validation=null"]
    with pytest.raises(ConfigError) as error:
        load_raw_splits(topics_task(*files).task, topics_task(*files).data)
    message = str(error.value)
    assert (
        f"{path}: byte {first} (0xe9) is not valid utf-8" in message
        and "task.local.encoding=latin-1" in message
    )
    config = topics_task(*files, "task.local.encoding=latin-1")
    splits = load_raw_splits(config.task, config.data)
    texts = sorted([*splits["train"]["text"], *splits["validation"]["text"]])
    assert texts == sorted(row["text"] for row in ACCENTED)


def test_an_unknown_encoding_is_refused_when_the_config_composes():
    with pytest.raises(
        ConfigError, match=r"task.local.encoding='latin-9000' is not an encoding Python knows"
    ):
        topics_task("task.local.encoding=latin-9000")

"""Tasks load from the real official files, render their templates, and split as documented.

Expected counts come from ../shared/data/MANIFEST.md (independent of ptlab's loaders).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import ptlab
from ptlab.config.schema import to_object
from ptlab.data.examples import (
    chunks,
    epoch_batches,
    epoch_order,
    load_raw_splits,
    split_rows,
    tokenize_splits,
)
from ptlab.data.tasks import render_source
from ptlab.data.token_cache import cached_tokenize
from ptlab.errors import ConfigError

from conftest import TINY, compose_config

# task: (train rows, validation rows, validation class counts in verbalizer order)
MANIFEST = {
    "sst2": (67349, 872, [428, 444]),
    "mrpc": (3668, 408, [129, 279]),
    "cola": (8551, 1043, [322, 721]),
    "stsb": (5749, 1500, None),
    "rte_glue": (2490, 277, [146, 131]),
    "cb": (250, 56, [23, 28, 5]),
    "copa": (400, 100, [55, 45]),
    "rte": (2490, 277, [146, 131]),
    "wic": (5428, 638, [319, 319]),
    "multirc": (27243, 4848, [2773, 2075]),
}


def load(task, *extra):
    config = to_object(compose_config([f"task={task}", *extra]))
    return config, load_raw_splits(config.task, config.data)


def lengths_as_ids(texts):
    return [[len(text)] for text in texts]


@pytest.mark.parametrize("task", sorted(MANIFEST))
def test_local_official_files_load_with_manifest_counts(task):
    config, raw = load(task)
    train_rows, val_rows, val_counts = MANIFEST[task]
    assert (len(raw["train"]), len(raw["validation"])) == (train_rows, val_rows)
    data = tokenize_splits(dict(raw), config.task, lengths_as_ids, 10_000)
    labels = [example.label for example in data["validation"]]
    if val_counts is not None:
        counts = Counter(labels)
        assert [counts[i] for i in range(len(config.task.verbalizers))] == val_counts
    assert min(labels) >= 0 and max(labels) < len(config.task.verbalizers)
    text = render_source(config.task, raw["validation"][0])
    assert "{" not in text and len(text) > len(config.task.template) - 40


def test_mrpc_template_reads_the_renamed_official_columns():
    config, raw = load("mrpc")
    row = raw["validation"][0]
    assert render_source(config.task, row).startswith(f"mrpc sentence1: {row['sentence1']} sentence2: ")


def test_stsb_bins_scores_and_keeps_raw_values():
    config, raw = load("stsb")
    data = tokenize_splits(dict(raw), config.task, lengths_as_ids, 10_000)
    for example in data["validation"][:50]:
        assert float(config.task.verbalizers[example.label]) == pytest.approx(
            round(example.target_value * 5) / 5
        )
    assert np.mean([e.target_value for e in data["validation"]]) == pytest.approx(2.364, abs=1e-3)


def test_multirc_groups_answers_by_question():
    _, raw = load("multirc")
    assert len(set(raw["validation"]["group"])) == 953  # questions, per MANIFEST


def test_boolq_with_fewglue_train_override():
    _, raw = load("boolq", "task.local.train=superglue/boolq/train32.jsonl")
    assert (len(raw["train"]), len(raw["validation"])) == (32, 3270)


def test_missing_local_files_and_no_hub_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"glue/qnli/train.tsv.*data.dir"):
        load("qnli")


def test_smop_protocol_holds_out_a_stratified_tenth_and_tests_on_validation():
    config, raw = load("rte", "data.split_protocol=smop")
    splits = split_rows(raw, config.task, config.data, seed=0)
    assert len(splits["test"]) == 277
    assert len(splits["train"]) + len(splits["validation"]) == 2490
    assert abs(len(splits["validation"]) - 249) <= 2
    assert not set(splits["train"]["idx"]) & set(splits["validation"]["idx"])
    share = Counter(splits["validation"]["label"])["entailment"] / len(splits["validation"])
    assert share == pytest.approx(1249 / 2490, abs=0.01)
    again = split_rows(raw, config.task, config.data, seed=5)  # the partition is shared across seeds
    assert again["validation"]["idx"] == splits["validation"]["idx"]


def test_smop_protocol_keeps_multirc_questions_whole():
    config, raw = load("multirc", "data.split_protocol=smop")
    splits = split_rows(raw, config.task, config.data, seed=0)
    assert not set(splits["train"]["group"]) & set(splits["validation"]["group"])


def test_heavy_truncation_is_warned_about(caplog):
    config, raw = load("rte")
    tokenize_splits(
        {"validation": raw["validation"]},
        config.task,
        lambda texts: [[0] * min(len(t), 64) for t in texts],
        64,
    )
    assert "are truncated at data.max_source_length=64" in caplog.text


def test_length_grouped_batches_cover_the_epoch_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 120, size=1000).tolist()
    grouped = epoch_batches(lengths, 16, seed=3, epoch=2, group_by_length=True)
    plain = epoch_batches(lengths, 16, seed=3, epoch=2, group_by_length=False)
    assert plain == [list(b) for b in chunks(epoch_order(1000, 3, 2), 16)]
    for batches in (grouped, plain):
        assert sorted(i for batch in batches for i in batch) == list(range(1000))
        assert all(1 <= len(batch) <= 16 for batch in batches)

    def padded(batches):
        return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)

    assert padded(grouped) < 0.6 * padded(plain)
    # a function of (seed, epoch) only: resume replays the same batches; epochs differ
    assert grouped == epoch_batches(lengths, 16, seed=3, epoch=2, group_by_length=True)
    assert grouped != epoch_batches(lengths, 16, seed=3, epoch=3, group_by_length=True)
    # the batch order is shuffled, not a length ramp
    first_max = [max(lengths[i] for i in batch) for batch in grouped[:10]]
    assert first_max != sorted(first_max, reverse=True)


def test_tokenized_splits_are_cached_and_keyed_by_what_they_hold(tmp_path, monkeypatch):
    monkeypatch.setenv("PTLAB_CACHE", str(tmp_path))
    calls = []

    def tokenize(texts):
        calls.append(len(texts))
        return [[len(text), 7, 1] for text in texts]

    texts = ["a", "bb", "ccc"]
    first = cached_tokenize(texts, tokenize, "tok", 8)
    assert cached_tokenize(texts, tokenize, "tok", 8) == first == tokenize(texts) and calls == [3, 3]
    cached_tokenize(texts, tokenize, "tok", 16)  # another max length
    cached_tokenize([*texts, "d"], tokenize, "tok", 8)  # other rows (file, template, subsample)
    cached_tokenize(texts, tokenize, "another tokenizer", 8)
    assert calls == [3, 3, 3, 4, 3]
    for entry in (tmp_path / "tokenized").glob("*.npz"):  # a damaged entry is rebuilt, not trusted
        entry.write_bytes(b"not an npz file")
    assert cached_tokenize(texts, tokenize, "tok", 8) == first and calls[-1] == 3 and len(calls) == 6


def test_a_pipeline_built_from_the_cache_holds_the_same_examples(tmp_path, monkeypatch):
    monkeypatch.setenv("PTLAB_CACHE", str(tmp_path))
    overrides = [*TINY, "backbone=tiny_t5"]
    fresh = ptlab.build(compose_config(overrides)).data
    assert list((tmp_path / "tokenized").glob("*.npz"))
    cached = ptlab.build(compose_config(overrides)).data
    for split in ("train", "validation"):
        assert cached[split] == fresh[split]

"""Caches that parallel jobs share (dequantized GGUF models, tokenized splits): one job builds an
entry while the others wait for it, no reader sees a half-swapped folder, and an entry's key names
its source (where it is, its size and modification time)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from pathlib import Path

from transformers import AutoModelForCausalLM

from ptlab.model.loading import _dequantized_gguf, gguf_cache_key

from helpers import write_tiny_gguf


def slow_tokenize(texts):
    """Tokenizing that takes a while and says each time it runs (the cache's one writer)."""
    with open(Path(os.environ["PTLAB_CACHE"]) / "tokenize-calls", "a") as handle:
        handle.write(f"{os.getpid()}\n")
    time.sleep(0.5)  # long enough that a second job checks the cache before the first has written it
    return [[len(text)] for text in texts]


def job(number: int, model_folder: str, start, out: str) -> None:
    """One of several jobs that start together and need the same cache entries."""
    from ptlab.data.token_cache import cached_tokenize

    logging.basicConfig(filename=f"{out}/job{number}.log", level=logging.INFO)
    start.wait()  # both jobs are loaded: from here on they race
    folder = _dequantized_gguf(model_folder, "tiny.gguf", AutoModelForCausalLM)
    seen = sorted(item.name for item in folder.iterdir())  # what this job found when it was handed the folder
    ids = cached_tokenize(["a film", "dull"], slow_tokenize, "tok", 8)
    Path(f"{out}/job{number}.json").write_text(json.dumps({"folder": str(folder), "seen": seen, "ids": ids}))


def test_two_jobs_at_once_build_each_shared_cache_entry_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PTLAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    write_tiny_gguf((tmp_path / "model").mkdir() or tmp_path / "model" / "tiny.gguf")
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    jobs = [context.Process(target=job, args=(n, str(tmp_path / "model"), start, str(tmp_path))) for n in (0, 1)]
    for process in jobs:
        process.start()
    for process in jobs:
        process.join(timeout=300)
    assert [process.exitcode for process in jobs] == [0, 0]
    results = [json.loads((tmp_path / f"job{n}.json").read_text()) for n in (0, 1)]
    assert results[0]["folder"] == results[1]["folder"]
    assert all({"config.json", "model.safetensors", "tokenizer.json"} <= set(r["seen"]) for r in results)
    logs = "".join((tmp_path / f"job{n}.log").read_text() for n in (0, 1))
    assert logs.count("dequantizing") == 1  # one job converted the file, the other waited for it
    assert results[0]["ids"] == results[1]["ids"] == [[6], [4]]
    assert len((tmp_path / "cache" / "tokenize-calls").read_text().splitlines()) == 1
    gguf = tmp_path / "cache" / "gguf"
    assert [item.name for item in gguf.iterdir() if not item.name.startswith(".")] == [Path(results[0]["folder"]).name]


def test_the_gguf_key_names_the_file_where_it_is_its_size_and_its_time(tmp_path):
    first = write_tiny_gguf((tmp_path / "a" / "model").mkdir(parents=True) or tmp_path / "a/model/tiny.gguf")
    other = write_tiny_gguf((tmp_path / "b" / "model").mkdir(parents=True) or tmp_path / "b/model/tiny.gguf")
    key = gguf_cache_key(first)
    assert key.startswith("tiny-") and key == gguf_cache_key(first)
    assert gguf_cache_key(other) != key  # two folders of one name (or two hub organisations' files)
    write_tiny_gguf(first, seed=1)  # the file changed: same name and size, another time
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 1_000_000))
    assert gguf_cache_key(first) != key

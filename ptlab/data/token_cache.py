"""Tokenized inputs cached on disk, so the jobs of a sweep (and every rerun) tokenize a split once:
SST-2's 67k training rows take seconds to tokenize and a tenth of a second to load back.

The key is a digest of the tokenizer's identity, the maximum length and the rendered input texts
themselves, so a change of data file, template, subsample or tokenizer can never hit a stale entry.
Entries live under `$PTLAB_CACHE/tokenized/` (default `~/.cache/ptlab`); `data.cache_tokenized=false`
turns the cache off.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from ptlab.files import cache_dir, one_writer, write_file_atomically

log = logging.getLogger(__name__)

PROBE = "ptlab probe: Ünïcödé, 123 ✓ <s>"  # tokenizers that differ anywhere that matters differ here


def tokenizer_identity(tokenizer) -> str:
    """Class, name or path, vocabulary size, and the ids it gives a probe text."""
    ids = tokenizer(PROBE)["input_ids"]
    return f"{type(tokenizer).__name__}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}|{ids}"


def cache_key(texts: List[str], identity: str, max_length: int) -> str:
    digest = hashlib.sha256(f"{identity}|{max_length}|{len(texts)}".encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _load(path: Path) -> Optional[List[List[int]]]:
    """A cache entry's rows, or None when there is none or it cannot be read (then it is rebuilt)."""
    if not path.exists():
        return None
    try:
        with np.load(path) as saved:
            flat, lengths = saved["flat"], saved["lengths"]
    except (OSError, ValueError, KeyError) as error:
        log.warning("tokenized cache %s unreadable (%s): tokenizing again", path, error)
        return None
    ends = np.cumsum(lengths)
    return [flat[start:end].tolist() for start, end in zip(ends - lengths, ends)]


def _save(path: Path, ids: List[List[int]]) -> None:
    lengths = np.array([len(row) for row in ids], dtype=np.int64)
    flat = np.fromiter((token for row in ids for token in row), dtype=np.int64, count=int(lengths.sum()))
    write_file_atomically(path, lambda tmp: np.savez(tmp, flat=flat, lengths=lengths))


def cached_tokenize(
    texts: List[str], tokenize: Callable[[List[str]], List[List[int]]], identity: str, max_length: int
) -> List[List[int]]:
    """`tokenize(texts)`, from the disk cache when these texts were tokenized this way before. The
    jobs of a sweep that start together tokenize a split once: one builds the entry (`one_writer`),
    the others wait and load it."""
    path = cache_dir() / "tokenized" / f"{cache_key(texts, identity, max_length)}.npz"
    ids = _load(path)
    if ids is not None:
        return ids
    try:
        with one_writer(path):
            ids = _load(path)  # built by another job while this one waited
            if ids is None:
                ids = tokenize(texts)
                _save(path, ids)
    except OSError as error:  # a read-only or full cache costs speed, never the run
        log.warning("tokenized cache not written (%s)", error)
        ids = ids if ids is not None else tokenize(texts)
    return ids

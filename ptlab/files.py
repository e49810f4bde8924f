"""Files and folders written so that no reader ever sees half of one: written aside under a name of
this process, flushed to disk, then renamed into place (a rename is atomic on POSIX file systems).
Checkpoints, summary.json, metrics.jsonl's resume truncation, the tokenized cache and dequantized
models are all written this way; a cache entry that several jobs may need is built by one of them
at a time (`one_writer`), the others waiting for it."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock


def cache_dir() -> Path:
    """ptlab's own cache (tokenized splits, dequantized GGUF models): `PTLAB_CACHE`, else ~/.cache/ptlab."""
    return Path(os.environ.get("PTLAB_CACHE", Path.home() / ".cache" / "ptlab"))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` for a file beside `path` (same suffix, so writers that add one, such as
    numpy's, keep the name), then rename it to `path`: concurrent writers each leave a whole file,
    and the last one wins. Errors propagate as they are; the temporary file never stays."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextmanager
def one_writer(target: Path) -> Iterator[None]:
    """Held while a shared cache entry (`target`) is built: parallel jobs that need the same entry
    wait for the one building it and then read it, instead of each building it and swapping it in
    under the others. A lock file beside `target` (filelock), released when its process dies."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.with_name(f".{target.name}.lock")):
        yield


def write_folder_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_folder)`, then make that folder `target` with no moment without one: the
    old folder is renamed aside (`<name>.old`, which a reader takes when the swap was cut short)
    before the new one is renamed in. A failed write removes its temporary folder and raises.
    One writer per folder (a run's checkpoints; a cache entry under `one_writer`) writes to
    `.<name>.tmp`, so the next write clears what a killed one left."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        for item in tmp.iterdir():
            if item.is_file():
                _fsync(item)
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f"{target.name}.old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    _fsync(target.parent)
    shutil.rmtree(old, ignore_errors=True)

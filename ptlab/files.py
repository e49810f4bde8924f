"""Files and folders written so that no reader ever sees half of one: written aside under a name of
this process, flushed to disk, then renamed into place (a rename is atomic on POSIX file systems).
Checkpoints, summary.json, the tokenized cache and dequantized models are all written this way."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


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


def write_folder_atomically(target: Path, write: Callable[[Path], None], shared: bool = False) -> None:
    """Call `write(tmp_folder)`, then make that folder `target` with no moment without one: the
    old folder is renamed aside (`<name>.old`, which a reader takes when the swap was cut short)
    before the new one is renamed in. A failed write removes its temporary folder and raises.
    One writer per folder (a run's checkpoints) writes to `.<name>.tmp`, so the next write clears
    what a killed one left; `shared` folders (caches several jobs may fill at once) to one per process."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp" if shared else f".{target.name}.tmp")
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

"""A process that holds a run folder through ptlab's lock (ptlab/training/folder_lock.py) until its
stdin closes: `python folder_holder.py <folder> <timeout_s>` prints `held` once it holds it."""

from __future__ import annotations

import sys
from pathlib import Path

from ptlab.training.folder_lock import FolderLocks

if __name__ == "__main__":
    folder, timeout_s = Path(sys.argv[1]), float(sys.argv[2])
    with FolderLocks() as locks:
        locks.take(folder, timeout_s)
        print("held", flush=True)
        sys.stdin.read()

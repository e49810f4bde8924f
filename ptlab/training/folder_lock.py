"""One writer per run folder: the process that trains in a folder holds it until its run ends.

A second process on the folder (the same command started twice, a requeued job whose first run
still trains, a sweep launched twice, packed or not) is refused with one line naming the holder,
before it writes anything there. Two things decide, because no one mechanism holds on every file
system:

- the OS lock, `fcntl.flock` on `<run>/.ptlab.lock` (never removed, so every process locks the
  same file). The kernel frees it when its process dies, kill -9 included, so on one host a dead
  holder never blocks a rerun; NFS honours it across hosts (its server frees a lost client's
  locks once the client's lease runs out).
- the holder record, `<run>/.ptlab.holder.json` (host, pid, started, heartbeat, timeout_s), whose
  heartbeat a daemon thread refreshes every `timeout_s / 10`. A file system that keeps locks per
  host (or none: ENOLCK) grants the OS lock while another host's process trains; so, OS lock in
  hand, a taker waits on a holder on another host whose heartbeat is younger than the timeout (the
  larger of the holder's and its own): a heartbeat that moves means it lives (refused); one that
  grows older than the timeout means its host is gone (taken over: a pack Ray retries on another
  node after losing one resumes there). On this host, where the OS lock decides, a record's holder
  blocks only where no lock is kept and its pid still lives.

The heartbeat rule assumes the hosts' clocks agree within a small part of the timeout.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from ptlab.errors import FolderHeld
from ptlab.files import write_text_atomically
from ptlab.training.run_folder import read_json_record, unwritable

log = logging.getLogger("ptlab")

LOCK_FILE = ".ptlab.lock"
HOLDER_FILE = ".ptlab.holder.json"
HOST = socket.gethostname()
BEATS_PER_TIMEOUT = 10


def pid_alive(pid: int) -> bool:
    """Whether a process of this id lives on this host (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Holder:
    """A holder record: who trains in the folder, since when, and when it last said it lives."""

    host: str
    pid: int
    started: float
    heartbeat: float
    timeout_s: float

    @classmethod
    def read(cls, folder: Path) -> Optional[Holder]:
        """The folder's holder record, or None: none, torn, or not one."""
        record = read_json_record(folder / HOLDER_FILE) or {}
        try:
            return cls(str(record["host"]), int(record["pid"]), float(record["started"]),
                       float(record["heartbeat"]), float(record.get("timeout_s", 0)))  # fmt: skip
        except (KeyError, TypeError, ValueError):
            return None

    def write(self, folder: Path) -> None:
        write_text_atomically(folder / HOLDER_FILE, json.dumps(asdict(self)))

    def blocks(self, os_locked: bool, timeout_s: float, now: float) -> bool:
        """Whether this holder may still train although this process got the OS lock (`os_locked`
        false: the file system keeps none)."""
        if self.host == HOST:
            return not os_locked and pid_alive(self.pid)
        return now - self.heartbeat < max(timeout_s, self.timeout_s)

    def is_this_process(self) -> bool:
        return (self.host, self.pid) == (HOST, os.getpid())

    def died_here(self) -> bool:
        """Whether its process was on this host and is gone (killed: its record outlived it)."""
        return self.host == HOST and not pid_alive(self.pid)


def refusal(folder: Path, holder: Optional[Holder]) -> FolderHeld:
    fix = "wait for it to end, or choose another folder (hydra.run.dir=..., hydra.sweep.dir=... for a sweep)"
    if holder is None:
        return FolderHeld(f"run folder {folder} is held by another process (no holder record yet): {fix}")
    age = time.time() - holder.heartbeat
    return FolderHeld(
        f"run folder {folder} is held by pid {holder.pid} on host {holder.host} (heartbeat {age:.0f} s ago): {fix}"
    )


def outlived(folder: Path, holder: Holder, timeout_s: float) -> Optional[Holder]:
    """Wait on a holder on another host with a recent heartbeat until it beats again (it lives:
    FolderHeld) or its heartbeat is older than the timeout (its host is gone: returned, to be taken
    over); None when it gave the folder up meanwhile."""
    limit = max(timeout_s, holder.timeout_s)
    log.info("%s is held by pid %d on host %s, whose heartbeat is %.0f s old: waiting up to %.0f s for it to "
             "beat again (it lives) or go stale (its host is gone)", folder, holder.pid, holder.host,
             time.time() - holder.heartbeat, limit)  # fmt: skip
    while True:
        time.sleep(min(1.0, limit / BEATS_PER_TIMEOUT / 2))
        current = Holder.read(folder)
        if current is None:
            return None
        if (current.host, current.pid, current.heartbeat) != (holder.host, holder.pid, holder.heartbeat):
            raise refusal(folder, current)
        if time.time() - current.heartbeat >= limit:
            return current


def os_lock(fd: int) -> bool:
    """Take the OS lock without waiting: True when taken, False when the file system keeps no
    locks; BlockingIOError when another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise
    return True


class FolderLocks:
    """The run folders this process holds, and the daemon thread that keeps their heartbeats
    fresh. As a context manager, leaving it releases every folder it holds (an exception too)."""

    def __init__(self) -> None:
        self.held: Dict[Path, Tuple[int, Holder]] = {}  # folder -> its lock file's descriptor, record
        self.guard = threading.Lock()  # the heartbeat never writes a record being released
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def __enter__(self) -> FolderLocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        for folder in list(self.held):
            self.release(folder)

    def take(self, folder: Path, timeout_s: float) -> None:
        """Hold `folder` (which exists) for this process, or raise FolderHeld naming its holder
        (a ConfigError: an unwritable folder)."""
        folder = folder.absolute()
        try:
            fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise unwritable(folder, error) from None
        try:
            os_locked = os_lock(fd)
            now, holder = time.time(), Holder.read(folder)
            if holder is not None and holder.blocks(os_locked, timeout_s, now):
                if holder.host == HOST:
                    raise refusal(folder, holder)
                holder = outlived(folder, holder, timeout_s)
                now = time.time()
            mine = Holder(HOST, os.getpid(), now, now, timeout_s)
            mine.write(folder)
        except BlockingIOError:
            os.close(fd)
            raise refusal(folder, Holder.read(folder)) from None
        except OSError as error:  # the record cannot be written (a full disk)
            os.close(fd)
            raise unwritable(folder, error) from None
        except BaseException:
            os.close(fd)  # closing it frees the OS lock
            raise
        if holder is not None and holder.host == HOST:  # its process died: the OS freed its lock
            log.warning("%s: freed by pid %d, which died; taken", folder, holder.pid)
        elif holder is not None:  # its heartbeat is older than the timeout: its host is gone
            log.warning("%s: taken over from pid %d on host %s, whose last heartbeat is %.0f s old",
                        folder, holder.pid, holder.host, now - holder.heartbeat)  # fmt: skip
        with self.guard:
            self.held[folder] = (fd, mine)
        if self.thread is None:
            self.thread = threading.Thread(target=self.beat, name="ptlab-folder-heartbeat", daemon=True)
            self.thread.start()

    def release(self, folder: Path) -> None:
        """Give `folder` up: its holder record goes (unless another process took it over), then its
        OS lock."""
        folder = folder.absolute()
        with self.guard:
            fd, mine = self.held.pop(folder)
            current = Holder.read(folder)
            if current is not None and current.is_this_process() and current.started == mine.started:
                (folder / HOLDER_FILE).unlink(missing_ok=True)
            os.close(fd)

    def beat(self) -> None:
        """Refresh every held folder's heartbeat, every tenth of the shortest timeout."""
        while True:
            with self.guard:
                period = min((mine.timeout_s for _, mine in self.held.values()), default=1.0)
            if self.stop.wait(period / BEATS_PER_TIMEOUT):
                return
            with self.guard:
                for folder, (_, mine) in self.held.items():
                    mine.heartbeat = time.time()
                    try:
                        mine.write(folder)
                    except OSError as error:  # a full disk: the next beat tries again
                        log.warning("%s: heartbeat not written (%s)", folder, error.strerror or error)

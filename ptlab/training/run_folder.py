"""What a run leaves in its folder besides checkpoints and metrics: its config snapshots
(`.hydra/`), its log (`train.log`), its summary and, when it fails, its one-line error; and the one
reader of the summary and failure records (the finished-run skip, the sweep report, ptlab-compare).

Snapshots and log wait until the run has started (config, data and model checked), so a rerun that
fails its checks in the folder of an earlier good run leaves that run's record as it was; the log
lines written before the start are kept in memory and land in the file once it opens.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from logging.handlers import MemoryHandler
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from omegaconf import DictConfig, OmegaConf

from ptlab.errors import ConfigError, FolderHeld
from ptlab.files import write_text_atomically

FAILURE_FILE = "failure.json"
SUMMARY_FILE = "summary.json"


def unwritable(run_dir: Path, error: OSError) -> ConfigError:
    """The one line for a run folder this process cannot write in."""
    return ConfigError(f"cannot write the run folder {run_dir}: {error.strerror or error}; "
                       "choose another one with hydra.run.dir=...")  # fmt: skip


def read_json_record(path: Path) -> Optional[Dict[str, Any]]:
    """A summary or failure record, or None when it is missing, torn or not a JSON object."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_record(path: Path, load: Callable[[Path], Any], fix: str) -> Dict[str, Any]:
    """A record that a reuse of the run needs (its composed config, its prompt, the prompt's record),
    a mapping read by `load`; when it is empty, cut short or not a mapping, one line naming the file,
    what is wrong (the parser's own words) and `fix`, never a parser's traceback."""
    try:
        loaded = load(path) if path.stat().st_size else None
    except Exception as error:  # each parser's own error (yaml, json, safetensors): the file is damaged
        mark = getattr(error, "problem_mark", None)  # yaml's: where its parser stopped
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        reason = f"{error.problem} at line {mark.line + 1}" if mark is not None else reason
    else:
        if isinstance(loaded, dict):
            return loaded
        reason = "empty" if loaded is None else f"a {type(loaded).__name__}, not a mapping"
    raise ConfigError(f"{path} cannot be read ({reason}): {fix}")


def read_summary(run_dir: Path) -> Optional[Dict[str, Any]]:
    return read_json_record(run_dir / SUMMARY_FILE)


def read_events(run_dir: Path) -> List[Dict[str, Any]]:
    """Every event of the folder's `metrics.jsonl`, in order; a line cut by a kill is skipped (the
    rest of the file still counts)."""
    path = run_dir / "metrics.jsonl"
    events = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def is_finished(summary: Optional[Dict[str, Any]]) -> bool:
    return summary is not None and summary.get("status") == "finished"


def write_summary(run_dir: Path, values: Dict[str, Any]) -> None:
    write_text_atomically(run_dir / SUMMARY_FILE, json.dumps(values, indent=2, default=str))


@dataclass
class RunFacts:
    """What the launcher knows about a run that its config does not say: its folder, the sweep it
    is in, the overrides it was started with. The entry point (ptlab/cli/train.py) reads them from
    Hydra once and passes them down, so nothing below it reads Hydra's process-wide state; the
    default is a run Hydra did not launch (tests, a script calling `job.run`), which writes no
    `.hydra/` snapshots and no log file."""

    run_dir: Optional[Path] = None
    group: Optional[str] = None  # the W&B group: the experiment's name, else the sweep's folder
    experiment: Optional[str] = None
    overrides: List[str] = field(default_factory=list)  # the command line's, as typed
    swept: List[str] = field(default_factory=list)  # the keys a multirun varies (they lead run names)
    multirun: bool = False
    job_name: str = "train"  # the log file is `<job_name>.log`
    hydra_config: Optional[DictConfig] = None  # Hydra's own config (`hydra:`), for `.hydra/hydra.yaml`


SPEAKER: ContextVar[Optional[RunLog]] = ContextVar("ptlab_speaking_run", default=None)


class OwnLines(logging.Filter):
    """Lets into a run's log the lines logged while that run speaks, and those logged while no
    run does (a pack's own lines): in a pack each member's train.log has its own lines only."""

    def __init__(self, owner: RunLog) -> None:
        super().__init__()
        self.owner = owner

    def filter(self, record: logging.LogRecord) -> bool:
        return SPEAKER.get() in (None, self.owner)


class RunLog:
    """The run's log file, opened by `start()`; what was logged before is buffered until then and
    dropped if the run never starts. Runs that share a process (a pack) log inside `speaking()`."""

    def __init__(self) -> None:
        self.buffer = MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1)
        self.buffer.addFilter(OwnLines(self))
        self.file: Optional[logging.FileHandler] = None

    def __enter__(self) -> RunLog:
        logging.getLogger().addHandler(self.buffer)
        return self

    @contextmanager
    def speaking(self) -> Iterator[None]:
        """Inside, log lines are this run's: they go to its log, not to the other members'."""
        token = SPEAKER.set(self)
        try:
            yield
        finally:
            SPEAKER.reset(token)

    def start(self, path: Path) -> None:
        """Open the log (appending: a resumed run continues its log) and write the buffered lines."""
        root = logging.getLogger()
        self.file = logging.FileHandler(path, encoding="utf-8")
        self.file.addFilter(OwnLines(self))
        formatters = [handler.formatter for handler in root.handlers if handler.formatter is not None]
        if formatters:
            self.file.setFormatter(formatters[0])  # the console's: conf/hydra/job_logging/ptlab.yaml
        self.buffer.setTarget(self.file)
        self.buffer.flush()
        root.removeHandler(self.buffer)
        root.addHandler(self.file)

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        root.removeHandler(self.buffer)
        self.buffer.buffer.clear()
        if self.file is not None:
            root.removeHandler(self.file)
            self.file.close()


def save_snapshots(run_dir: Path, cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """`.hydra/config.yaml`, `hydra.yaml` and `overrides.yaml`, as Hydra writes them (with
    `hydra.output_subdir=null` it does not): what `ptlab-eval`, `ptlab-compare` and a resume read."""
    folder = run_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    for name, node in (
        ("config.yaml", cfg),
        ("hydra.yaml", hydra_cfg),
        ("overrides.yaml", hydra_cfg.hydra.overrides.task),
    ):
        write_text_atomically(folder / name, OmegaConf.to_yaml(node))


def record_failure(run_dir: Path, error: Exception) -> None:
    """A failed job's one-line error, for ptlab's sweep report (ptlab/sweep/hooks.py, `FailedJobs`) and
    `ptlab-compare`. A finished run's summary is never replaced: a failed rerun of it leaves its
    result standing and says only, in `failure.json`, that the rerun failed. A refusal to write a
    folder another process holds writes nothing: that folder's run is not this one."""
    if isinstance(error, FolderHeld):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    failure = {"status": "failed", "error": str(error), "kind": type(error).__name__}
    write_text_atomically(run_dir / FAILURE_FILE, json.dumps(failure, indent=2))
    if not is_finished(read_summary(run_dir)):
        write_summary(run_dir, failure)

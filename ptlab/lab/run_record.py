"""Finished, failed and unfinished run folders, read back from disk: what `ptlab-compare` (and any
analysis of a sweep) starts from. A run folder is what `ptlab-train` writes: `.hydra/` (the composed
config and the command-line overrides), `metrics.jsonl` (every logged event) and `summary.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import yaml

from ptlab.config.renamed import todays_key, with_todays_names
from ptlab.training.run_folder import SUMMARY_FILE, read_events, read_summary


@dataclass
class RunRecord:
    path: Path
    overrides: Dict[str, str] = field(default_factory=dict)  # key -> value, as typed on the command line
    config: Dict[str, Any] = field(default_factory=dict)  # the composed config (.hydra/config.yaml)
    summary: Optional[Dict[str, Any]] = None
    events: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        """finished | failed | unfinished (running, cut short, or never started)."""
        return (self.summary or {}).get("status", "unfinished")

    @property
    def task(self) -> str:
        return str(self.lookup("task.name") or (self.summary or {}).get("task", "?"))

    @property
    def seed(self) -> Optional[int]:
        seed = self.lookup("seed")
        return None if seed is None else int(seed)

    def lookup(self, key: str) -> Any:
        """A setting by its override key (`arm`, `method.prompt_length`): the command line's value
        when the run was given one, else the composed config's, else the summary's."""
        if key in self.overrides:
            return self.overrides[key]
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                node = None
                break
            node = node[part]
        if node is None and self.summary is not None:
            node = self.summary.get(key)
        return node

    def score(self, metric: Optional[str] = None, stat: str = "auto") -> Optional[float]:
        """The run's result for `metric` (default: the task's main one). stat: best (best validation),
        final (last validation), test, or auto: test when the run has a test split, else best."""
        if self.status != "finished":
            return None
        metric = metric or self.summary["main_metric"]
        return (self.summary.get(self.scored_stat(stat)) or {}).get(metric)

    def scored_stat(self, stat: str) -> str:
        """The statistic `stat` resolves to: auto is test when the run has a test split, else best."""
        if stat == "auto":
            return "test" if self.summary.get("test") else "best"
        return stat

    def curve(self, split: str, key: str) -> List[Dict[str, Any]]:
        """The run's `split` events that carry `key`, in step order."""
        return sorted(
            (e for e in self.events if e.get("split") == split and key in e), key=lambda e: e["step"]
        )


def read_run(path: Path) -> RunRecord:
    record = RunRecord(path=path)
    hydra_dir = path / ".hydra"
    if (hydra_dir / "overrides.yaml").exists():
        for item in yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) or []:
            key, _, value = str(item).partition("=")
            record.overrides[todays_key(key.lstrip("+~"))] = value
    if (hydra_dir / "config.yaml").exists():
        record.config = with_todays_names(yaml.safe_load((hydra_dir / "config.yaml").read_text()) or {})
    record.summary = read_summary(path)
    record.events = read_events(path)
    return record


def is_run_folder(path: Path) -> bool:
    return (path / SUMMARY_FILE).exists() or (path / ".hydra" / "config.yaml").exists()


def find_runs(paths: Iterable[Path]) -> List[RunRecord]:
    """Every run folder at or under `paths` (a run folder, a multirun folder, or a folder of them)."""
    found: Dict[Path, None] = {}
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such folder")
        if is_run_folder(root):
            found[root.resolve()] = None
            continue
        candidates = sorted({p.parent.parent for p in root.rglob(".hydra/config.yaml")} | {
            p.parent for p in root.rglob(SUMMARY_FILE)
        })  # fmt: skip
        for candidate in candidates:
            if is_run_folder(candidate) and "checkpoints" not in candidate.parts:
                found[candidate.resolve()] = None
    return [read_run(path) for path in found]

"""Where metrics go: `metrics.jsonl` and `summary.json` in the run folder always, W&B optionally.

W&B is a guest: any failure of it is logged as a warning and training goes on.
Without an API key W&B runs offline (a folder that `wandb sync` uploads later).
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from ptlab.config.schema import Config, LoggerConfig
from ptlab.files import write_text_atomically
from ptlab.training.run_folder import write_summary

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode(config: LoggerConfig) -> str:
    return config.mode or os.environ.get("WANDB_MODE") or ("online" if has_wandb_key() else "offline")


NOT_IN_NAMES = ("hydra.", "logger.", "logger=", "trainer.resume")


def key(item: str) -> str:
    """The key of a `key=value` override (`+`/`~` prefixes dropped)."""
    return item.lstrip("+~").split("=", 1)[0]


def run_name(overrides: List[str], swept: Sequence[str] = (), limit: int = 128) -> Optional[str]:
    """A W&B run name from the run's command-line overrides: the keys its sweep varies first (seed
    last among them), then the rest, whole `key=value` items only; what does not fit in `limit`
    characters is left out, never cut in the middle, so a sweep's jobs never share a name."""
    items = [item for item in overrides if not item.lstrip("+~").startswith(NOT_IN_NAMES)]
    rank = {k: i for i, k in enumerate(k for k in swept if k != "seed")}
    rank["seed"] = len(rank)
    varying = sorted((i for i in items if key(i) in rank and key(i) in swept), key=lambda i: rank[key(i)])
    name = ""
    for item in varying + [i for i in items if i not in varying]:
        candidate = f"{name},{item}" if name else item
        if len(candidate) > limit:
            if item in varying:  # a varying key that does not fit: the whole list then, uniqueness first
                name = candidate
            continue
        name = candidate
    return name or None


def wandb_config(cfg: DictConfig, config: Config, experiment: Optional[str]) -> Dict[str, Any]:
    """The resolved config for W&B, with what a dashboard groups by at the top: the method's label,
    the backbone, the task, the seed and the experiment (each group's full settings under
    `<group>_config`)."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=True)
    top = {
        "method": config.method.run_label,
        "backbone": config.backbone.name,
        "task": config.task.name,
        "seed": config.seed,
        "experiment": experiment,
    }
    for group in ("method", "backbone", "task"):
        top[f"{group}_config"] = container.pop(group)
    container.pop("seed", None)
    return {**top, **container}


class Tracker:
    """Appends events to metrics.jsonl and mirrors them to W&B when `logger=wandb`."""

    def __init__(
        self,
        run_dir: Path,
        config: LoggerConfig,
        wandb_init: Optional[Dict[str, Any]] = None,
        enabled: bool = True,
    ):
        """`enabled=False` (ranks other than 0 of a distributed run) records nothing anywhere. W&B
        starts with `start()`, once the run has passed its checks."""
        self.run_dir = run_dir
        self.enabled = enabled
        self.metrics_file = run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.config, self.wandb_init = config, wandb_init

    def start(self) -> None:
        if self.enabled and self.config.name == "wandb" and self.wandb_init is not None:
            self._start_wandb(self.config, self.wandb_init)

    def run_id(self) -> str:
        """The W&B run this run folder owns: made once, stored in the folder, continued by every
        later process on it (resume, requeue, a longer max_steps), so one folder is one W&B run."""
        id_file = self.run_dir / "wandb_id"
        if not id_file.exists():
            write_text_atomically(id_file, secrets.token_hex(4))
        return id_file.read_text().strip()

    def _start_wandb(self, config: LoggerConfig, init: Dict[str, Any]) -> None:
        mode = wandb_mode(config)
        try:
            import wandb

            os.environ.setdefault("WANDB_START_METHOD", "thread")  # W&B hangs under Hydra otherwise
            kwargs = dict(
                project=config.project, entity=config.entity, dir=str(self.run_dir), id=self.run_id(), resume="allow",
                reinit="create_new",  # this tracker's own run: other runs open in the process go on
                settings=wandb.Settings(silent=config.quiet, init_timeout=config.init_timeout),
                tags=[tag[:64] for tag in init.pop("tags", [])], **init,
            )  # fmt: skip
            try:
                self.wandb_run = wandb.init(mode=mode, **kwargs)
            except Exception as error:
                if mode != "online":
                    raise
                log.warning(
                    "W&B could not start online (%s): logging offline, upload with `wandb sync`", error
                )
                wandb.teardown()  # the failed attempt still holds the run id (and ends other open runs)
                self.wandb_run = wandb.init(mode="offline", **kwargs)
            self.wandb_run.define_metric("step")
            for prefix in ("train", "validation", "test"):
                self.wandb_run.define_metric(f"{prefix}/*", step_metric="step")
        except Exception as error:  # never let W&B kill training
            log.warning("W&B disabled for this run: %s", error)
            self.wandb_run = None

    def _wandb(self, call: str, *args, **kwargs) -> None:
        if self.wandb_run is None:
            return
        try:
            getattr(self.wandb_run, call)(*args, **kwargs)
        except Exception as error:
            log.warning("W&B %s failed (%s); continuing without it", call, error)
            self.wandb_run = None

    def wandb_info(self) -> Optional[Dict[str, Any]]:
        """Where this run lives in W&B (None without W&B): id, group, mode and its local folder."""
        if self.wandb_run is None:
            return None
        return {
            "id": self.wandb_run.id,
            "group": self.wandb_run.group,
            "name": self.wandb_run.name,
            "mode": self.wandb_run.settings.mode,
            "dir": self.wandb_run.dir,
        }

    def log(self, step: int, split: str, values: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **values}
        with open(self.metrics_file, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self._wandb("log", {"step": step, **{f"{split}/{k}": v for k, v in values.items()}})

    def truncate_after(self, step: int) -> None:
        """Drop events logged after `step`: a resumed run replays them from its checkpoint. The kept
        events are written aside and renamed in, so a kill during the rewrite keeps the history."""
        if not self.enabled or not self.metrics_file.exists():
            return
        kept = []
        for number, line in enumerate(self.metrics_file.read_text().splitlines(), 1):
            try:
                event = json.loads(line) if line else None
            except json.JSONDecodeError:  # a line cut by a kill: the log, not state; drop it
                log.warning("%s line %d is cut short (%r...): dropped", self.metrics_file, number, line[:40])
                continue
            if event is not None and event["step"] <= step:
                kept.append(line)
        write_text_atomically(self.metrics_file, "".join(line + "\n" for line in kept))

    def summary(self, values: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        write_summary(self.run_dir, values)
        if self.wandb_run is not None:
            flat = {f"{k}/{kk}": vv for k, v in values.items() if isinstance(v, dict) for kk, vv in v.items()}
            flat.update({k: v for k, v in values.items() if not isinstance(v, dict)})
            try:
                self.wandb_run.summary.update(flat)
            except Exception as error:
                log.warning("W&B summary failed: %s", error)

    def log_prompt(self, folder: Path, name: str, metadata: Dict[str, Any]) -> None:
        """Upload a prompt folder (checkpoints/best) as a W&B artifact of type `prompt`."""
        if self.wandb_run is None or not folder.is_dir():
            return
        try:
            import wandb

            artifact = wandb.Artifact(name, type="prompt", metadata=metadata)
            artifact.add_dir(str(folder))
            self.wandb_run.log_artifact(artifact)
        except Exception as error:
            log.warning("W&B prompt artifact failed: %s", error)

    def finish(self) -> None:
        self._wandb("finish")
        self.wandb_run = None

"""Checkpoints: a run's resumable state, and atomic folders that hold it.

A folder is written under a temporary name and swapped in by renames, so a kill at any moment
leaves a loadable checkpoint: either the new folder, or the previous one (kept as `<name>.old`
for the instant between the two renames and picked up by `find`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ptlab.errors import ConfigError, TrainingFault
from ptlab.training.randomness import RunRandomness

log = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_folder)`, then make that folder `target` without a window of no checkpoint.
    A write that fails (a full disk, a read-only folder) removes its temporary folder and raises a
    TrainingFault naming the path; the previous checkpoint is untouched."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous one ({target}) is intact" if target.exists() else "there is no earlier one"
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
        raise TrainingFault(f"cannot write the checkpoint {target} ({reason}); {kept}") from None
    _swap_in(tmp, target)


def _swap_in(tmp: Path, target: Path) -> None:
    old = target.with_name(f"{target.name}.old")
    for item in tmp.iterdir():
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(tmp)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def find(target: Path) -> Optional[Path]:
    """The checkpoint folder to load: `target`, or the previous one if a swap was interrupted."""
    for candidate in (target, target.with_name(f"{target.name}.old")):
        if (candidate / "state.pt").exists() or (candidate / "prompt.safetensors").exists():
            return candidate
    return None


def save_prompt(
    folder: Path,
    trainable: Dict[str, torch.Tensor],
    exported: Dict[str, torch.Tensor],
    prompt_config: Dict[str, Any],
) -> None:
    """The trained prompt as safetensors + JSON, loadable with `safetensors.torch.load_file` alone:
    `prompt.safetensors` holds every trained tensor (what ptlab reloads), `export.safetensors`
    the method's self-contained form (e.g. Residual's prompt with its MLP folded in)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, folder / "prompt.safetensors")
    save_file(exported, folder / "export.safetensors")
    (folder / "prompt_config.json").write_text(json.dumps(prompt_config, indent=2, default=str))


def save_training_state(folder: Path, state: Dict[str, Any]) -> None:
    torch.save(state, folder / "state.pt")


def load_training_state(folder: Path) -> Dict[str, Any]:
    return torch.load(folder / "state.pt", map_location="cpu", weights_only=False)


# method settings that do not change what a prompt is: how runs are named, where training started
NOT_IDENTITY = ("label", "init_from")


def prompt_identity(value: Any) -> Any:
    """A method config less the settings that do not change the trained prompt's meaning."""
    return {k: v for k, v in value.items() if k not in NOT_IDENTITY} if isinstance(value, dict) else value


def load_trainable(method: nn.Module, backbone: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Put saved trained tensors back: `method.*` into the method, `backbone.*` (a trained head)
    into the backbone's parameters of those names."""
    method.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("method.")})
    backbone_params = dict(backbone.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            if key.startswith("backbone."):
                backbone_params[key[9:]].copy_(value)


class RunCheckpoint:
    """A run folder's `checkpoints/last` (everything needed to continue exactly: trained tensors,
    optimizer, LR scheduler, the run's random streams, the loop's state) and `checkpoints/best` (the best
    prompt, loadable without ptlab)."""

    def __init__(
        self,
        run_dir: Path,
        method: nn.Module,
        backbone: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        randomness: RunRandomness,
        prompt_config: Dict[str, Any],
        writes: bool = True,
    ) -> None:
        self.method, self.backbone, self.optimizer, self.scheduler = method, backbone, optimizer, scheduler
        self.randomness = randomness
        self.prompt_config, self.writes = prompt_config, writes  # writes: rank 0 of a distributed run
        self.last_dir = run_dir / "checkpoints" / "last"
        self.best_dir = run_dir / "checkpoints" / "best"
        if writes:  # a write cut short (a kill, a full disk) leaves its temporary folder behind
            for folder in (self.last_dir, self.best_dir):
                shutil.rmtree(folder.with_name(f".{folder.name}.tmp"), ignore_errors=True)

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        state = {f"method.{k}": v for k, v in self.method.state_dict().items()}
        state.update({f"backbone.{n}": p for n, p in self.backbone.named_parameters() if p.requires_grad})
        return state

    def save_last(self, loop_state: Dict[str, Any]) -> None:
        if not self.writes:
            return
        state = {
            "trainable": {k: v.detach().cpu() for k, v in self.trainable_state().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "randomness": self.randomness.state_dict(),
            "train_state": loop_state,
            "prompt_config": self.prompt_config,
        }
        write_atomic_dir(self.last_dir, lambda folder: save_training_state(folder, state))

    def save_best(self, exported: Dict[str, torch.Tensor]) -> None:
        if not self.writes:
            return
        trainable = self.trainable_state()
        write_atomic_dir(
            self.best_dir, lambda folder: save_prompt(folder, trainable, exported, self.prompt_config)
        )

    def load_best(self) -> None:
        """Put the best prompt back into the method (for a final test evaluation)."""
        folder = find(self.best_dir)
        if folder is not None:
            load_trainable(self.method, self.backbone, load_file(folder / "prompt.safetensors"))

    def restore(self, run_dir: Path) -> Optional[Dict[str, Any]]:
        """Load `run_dir/checkpoints/last` if there is one; returns the loop's saved state."""
        folder = find(run_dir / "checkpoints" / "last")
        if folder is None:
            log.info("no checkpoint under %s: starting from step 0", run_dir)
            return None
        fix = "start over with trainer.resume=false, or run in a new folder (hydra.run.dir=...)"
        try:
            saved = load_training_state(folder)
            if not isinstance(saved, dict) or not {"prompt_config", "train_state", "trainable"} <= set(saved):
                raise ValueError("not a ptlab checkpoint")
        except Exception as error:
            raise ConfigError(
                f"{folder / 'state.pt'} cannot be read ({type(error).__name__}: {error}): {fix}"
            ) from None
        for key in ("method", "backbone", "task"):
            if prompt_identity(saved["prompt_config"].get(key)) != prompt_identity(
                self.prompt_config.get(key)
            ):
                raise ConfigError(
                    f"trainer.resume: the checkpoint in {folder} was trained with {key}="
                    f"{saved['prompt_config'].get(key)!r}, this run has {self.prompt_config.get(key)!r}"
                )
        trained_on = saved["prompt_config"].get("data")  # absent in checkpoints of before 2026-11-27
        if trained_on is not None and trained_on != self.prompt_config.get("data"):
            raise ConfigError(
                f"trainer.resume: the task's rows are not those the checkpoint in {folder} was trained on "
                "(a data file changed, or a data.* setting): resume with the same data, or " + fix
            )
        try:
            load_trainable(self.method, self.backbone, saved["trainable"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
        except (RuntimeError, KeyError, ValueError) as error:
            first = str(error).strip().splitlines()[0]
            raise ConfigError(f"{folder / 'state.pt'} does not fit this model ({first}): {fix}") from None
        if "randomness" in saved:
            self.randomness.load_state_dict(saved["randomness"])
        else:  # a checkpoint of before 2026-12-01 saved the process's global streams instead
            log.warning("%s holds no per-run random streams: they start afresh from the seed", folder)
        log.info("resumed from %s at step %d", folder, saved["train_state"]["step"])
        return saved["train_state"]


def best_prompt_dir(run_dir: Path) -> Path:
    folder = find(run_dir / "checkpoints" / "best")
    if folder is None:
        raise ConfigError(
            f"{run_dir} has no trained prompt (checkpoints/best): the run has not reached its first evaluation"
        )
    return folder


def saved_prompt(run_dir: Path) -> tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The best prompt's tensors (`method.*`, `backbone.*` keys) and its record."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder")
    folder = best_prompt_dir(run_dir)
    return load_file(folder / "prompt.safetensors"), json.loads((folder / "prompt_config.json").read_text())

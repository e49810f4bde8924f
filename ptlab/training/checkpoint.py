"""Checkpoints: a run's resumable state, and atomic folders that hold it.

A folder is written under a temporary name and swapped in by renames, so a kill at any moment
leaves a loadable checkpoint: either the new folder, or the previous one (kept as `<name>.old`
for the instant between the two renames and picked up by `find`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ptlab.config.difference import config_difference
from ptlab.config.schema import Config
from ptlab.errors import ConfigError, TrainingFault
from ptlab.files import write_folder_atomically
from ptlab.training.randomness import RunRandomness
from ptlab.training.run_folder import read_record

log = logging.getLogger(__name__)


def write_atomic_dir(target: Path, write: Callable[[Path], None]) -> None:
    """A checkpoint folder written atomically (ptlab.files). A write that fails (a full disk, a
    read-only folder) raises a TrainingFault naming the path; the previous checkpoint is untouched."""
    try:
        write_folder_atomically(target, write)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        kept = f"the previous one ({target}) is intact" if target.exists() else "there is no earlier one"
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
        raise TrainingFault(f"cannot write the checkpoint {target} ({reason}); {kept}") from None


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
    """Tensors, numbers, strings, lists and dicts only: what `load_training_state` reads back."""
    torch.save(state, folder / "state.pt")


def load_training_state(folder: Path) -> Dict[str, Any]:
    return read_plain(folder / "state.pt")


def read_plain(path: Path) -> Any:
    """A torch file of the run folder (`state.pt`, `ffn_scores.pt`) read without running code from
    it (`weights_only`: tensors and plain values, no other pickled object): a run folder is data,
    whoever wrote it. A file holding anything else is a ConfigError naming what it holds (the
    checkpoints of ptlab before 2026-12-01 held numpy's random state)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        held = f" ({found.group(1)})" if found else ""
        raise ConfigError(
            f"{path} holds objects other than tensors and plain values{held}, which ptlab does not unpickle "
            "(loading them could run code): today's ptlab did not write it; start over with "
            "trainer.resume=false, or run in a new folder (hydra.run.dir=...)"
        ) from None


# method settings that do not change what a prompt is: how runs are named, where training started
NOT_IDENTITY = ("label", "init_from")
# the entries of a prompt record (checkpoints/*/prompt_config.json) that say what the prompt is,
# and those that say what its run trained on besides (a resume and a finished-run skip check both)
PROMPT_KEYS = ("method", "backbone", "hidden_size", "verbalizers", "fingerprint")
RUN_KEYS = (*PROMPT_KEYS, "task", "data")
def prompt_identity(value: Any) -> Any:
    """A method config less the settings that do not change the trained prompt's meaning."""
    return {k: v for k, v in value.items() if k not in NOT_IDENTITY} if isinstance(value, dict) else value


def config_record(config: Config) -> Dict[str, Any]:
    """The part of a prompt record known from the config alone, before any model or data loads."""
    return {
        "method": dataclasses.asdict(config.method),
        "backbone": config.backbone.name,
        "task": config.task.name,
        "family": config.backbone.family,
        "verbalizers": list(config.task.verbalizers),
    }


def record_difference(
    saved: Dict[str, Any], current: Dict[str, Any], keys: Sequence[str] = RUN_KEYS
) -> Optional[str]:
    """The first of `keys` whose value differs between a saved prompt record and this run's, or
    None. The one check of whether a prompt fits (resume, finished-run skip, reuse); a key either
    record lacks (not recorded by an older ptlab, or not known yet) is not compared."""
    for key in keys:
        if key in saved and key in current and prompt_identity(saved[key]) != prompt_identity(current[key]):
            return key
    return None


# the key prefix of a readout's trained tensors (the encoder family's head): the name they had
# when the head was part of the backbone, kept so prompts saved before and after load alike
READOUT_KEYS = "backbone."


def load_trainable(method: nn.Module, readout: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Put saved trained tensors back: `method.*` into the method, `backbone.*` (a trained head)
    into the task readout's parameters of those names."""
    method.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("method.")})
    readout_params = dict(readout.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            if key.startswith(READOUT_KEYS):
                readout_params[key[len(READOUT_KEYS) :]].copy_(value)


class RunCheckpoint:
    """A run folder's `checkpoints/last` (everything needed to continue exactly: trained tensors,
    optimizer, LR scheduler, the run's random streams, the loop's state) and `checkpoints/best` (the best
    prompt, loadable without ptlab)."""

    def __init__(
        self,
        run_dir: Path,
        method: nn.Module,
        readout: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        randomness: RunRandomness,
        prompt_config: Dict[str, Any],
        writes: bool = True,
    ) -> None:
        self.method, self.readout, self.optimizer, self.scheduler = method, readout, optimizer, scheduler
        self.randomness = randomness
        self.prompt_config, self.writes = prompt_config, writes  # writes: rank 0 of a distributed run
        self.last_dir = run_dir / "checkpoints" / "last"
        self.best_dir = run_dir / "checkpoints" / "best"
        if writes:  # a write cut short (a kill, a full disk) leaves its temporary folder behind
            for folder in (self.last_dir, self.best_dir):
                shutil.rmtree(folder.with_name(f".{folder.name}.tmp"), ignore_errors=True)

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        state = {f"method.{k}": v for k, v in self.method.state_dict().items()}
        state.update({f"{READOUT_KEYS}{n}": p for n, p in self.readout.named_parameters() if p.requires_grad})
        return state

    def save_last(self, loop_state: Dict[str, Any]) -> None:
        if not self.writes:
            return
        state = {
            # copies: a packed run's tensors are slices of its stack's (saved alone, they would save it whole)
            "trainable": {k: v.detach().to("cpu", copy=True) for k, v in self.trainable_state().items()},
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
            load_trainable(self.method, self.readout, load_file(folder / "prompt.safetensors"))

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
        except ConfigError:
            raise
        except Exception as error:
            raise ConfigError(
                f"{folder / 'state.pt'} cannot be read ({type(error).__name__}: {error}): {fix}"
            ) from None
        key = record_difference(saved["prompt_config"], self.prompt_config)
        if key == "fingerprint":
            raise ConfigError(
                f"trainer.resume: the checkpoint in {folder} was trained on backbone weights and tokenizer "
                f"{saved['prompt_config'][key]}; {self.prompt_config['backbone']} now gives "
                f"{self.prompt_config[key]} (other weights behind the same name or path): point backbone.path "
                "at the weights it was trained on, or " + fix
            )
        changed = config_difference(
            saved["prompt_config"].get("config"), self.prompt_config.get("config", {})
        )
        if changed is not None and key is None:
            raise ConfigError(f"trainer.resume: the checkpoint in {folder} was trained with another config "
                              f"({changed}): resume with its settings, or " + fix)  # fmt: skip
        if key == "data":
            raise ConfigError(
                f"trainer.resume: the task's rows are not those the checkpoint in {folder} was trained on "
                "(a data file changed, or a data.* setting): resume with the same data, or " + fix
            )
        if key is not None:
            raise ConfigError(
                f"trainer.resume: the checkpoint in {folder} was trained with {key}="
                f"{saved['prompt_config'][key]!r}, this run has {self.prompt_config[key]!r}: {fix}"
            )
        try:
            load_trainable(self.method, self.readout, saved["trainable"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
        except (RuntimeError, KeyError, ValueError) as error:
            first = str(error).strip().splitlines()[0]
            raise ConfigError(f"{folder / 'state.pt'} does not fit this model ({first}): {fix}") from None
        if "randomness" in saved:
            self.randomness.load_state_dict(saved["randomness"])
            if saved["randomness"].get("dropout"):  # 22e2f2c and earlier drew dropout from a generator
                log.warning("%s was written by a ptlab that drew the frozen network's dropout from a stream "
                            "(22e2f2c and earlier): the run goes on with addressed masks, so it is not "
                            "bit-identical to an uninterrupted run of that version; for one, train it again "
                            "(trainer.resume=false)", folder)  # fmt: skip
        else:  # a checkpoint of before 2026-12-01 saved the process's global streams instead
            log.warning("%s holds no per-run random streams: they start afresh from the seed", folder)
        log.info("resumed from %s at step %d", folder, saved["train_state"]["step"])
        return saved["train_state"]


def best_prompt_dir(run_dir: Path) -> Path:
    """A run folder's `checkpoints/best`, or the folder itself when it is a prompt folder."""
    if (run_dir / "prompt.safetensors").is_file():
        return run_dir
    folder = find(run_dir / "checkpoints" / "best")
    if folder is None:
        raise ConfigError(
            f"{run_dir} has no trained prompt (checkpoints/best): the run has not reached its first evaluation"
        )
    return folder


# what to do about a damaged prompt folder
DAMAGED_PROMPT = "the saved prompt is damaged: restore the folder from a copy, or train the run again"


def read_prompt_record(path: Path) -> Dict[str, Any]:
    """A prompt folder's `prompt_config.json`; a damaged one is one line naming it."""
    return read_record(path, lambda file: json.loads(file.read_text()), DAMAGED_PROMPT)


def saved_prompt(run_dir: Path) -> tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The best prompt's tensors (`method.*`, `backbone.*` keys) and its record; a damaged one is
    one line naming the file."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder")
    folder = best_prompt_dir(run_dir)
    tensors = read_record(folder / "prompt.safetensors", load_file, DAMAGED_PROMPT)
    return tensors, read_prompt_record(folder / "prompt_config.json")

"""Atomic checkpoints: a folder is written under a temporary name and swapped in by renames.

A kill at any moment leaves a loadable checkpoint: either the new folder, or the previous one
(kept as `<name>.old` for the instant between the two renames and picked up by `find`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from safetensors.torch import save_file


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_folder)`, then make that folder `target` without a window of no checkpoint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    old = target.with_name(f"{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
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

"""Shared fixtures: no network, no W&B account, the real data files in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from ptlab.config.compose import compose

REPO = Path(__file__).resolve().parent.parent
# the real data files: ../shared/data, or wherever PTLAB_DATA_DIR points (the GPU kit's copy)
SHARED_DATA = Path(os.environ.get("PTLAB_DATA_DIR") or REPO.parent / "shared" / "data")
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
    "PTLAB_DATA_DIR": str(SHARED_DATA),
}
# tiny random models on a slice of real SST-2: a training run takes a second or two
TINY = [
    "logger=none",
    "data.max_train_examples=256",
    "data.max_eval_examples=64",
    "data.max_source_length=48",
]


@pytest.fixture(autouse=True)
def torch_threads():
    """A run's `hardware.num_threads` sets torch's thread count for the whole process: each test
    starts from the default, not from whatever an earlier test's run left."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def offline_env(monkeypatch, tmp_path):
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("PTLAB_CACHE", str(Path.home() / ".cache" / "ptlab"))
    yield
    GlobalHydra.instance().clear()


def compose_config(overrides: List[str]):
    """Compose like the CLI does, with the hydra node set so `${hydra:...}` would resolve."""
    cfg = compose(overrides, with_hydra=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


# method YAMLs that are recipes of a registered method rather than methods of their own
METHOD_ALIASES = {"pt100": "prompt_tuning"}


def group_values(group: str) -> List[str]:
    return sorted(path.stem for path in (REPO / "conf" / group).glob("*.yaml"))

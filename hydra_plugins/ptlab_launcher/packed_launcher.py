"""ptlab's Hydra launcher plugin, `hydra/launcher=packed`: Hydra finds launchers in the
`hydra_plugins` namespace package; the work is ptlab's (ptlab/sweep/launcher.py)."""

from __future__ import annotations

from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from ptlab.sweep.launcher import PackedLauncherConf, launch

ConfigStore.instance().store(group="hydra/launcher", name="packed", node=PackedLauncherConf, provider="ptlab")


class PackedLauncher(Launcher):
    """Trains a multirun's jobs in packs over one frozen backbone (ptlab/training/loop.py)."""

    def __init__(
        self, pack_size: Optional[int] = None, workers: Optional[int] = None, submitit: Optional[DictConfig] = None,
        ray: Optional[DictConfig] = None, mix_widths: bool = False, halving: Optional[DictConfig] = None,
    ) -> None:  # fmt: skip
        """`hydra.launcher.*`: see ptlab.sweep.launcher.PackedLauncherConf."""
        self.settings = DictConfig({"pack_size": pack_size, "workers": workers, "submitit": submitit, "ray": ray,
                                    "mix_widths": mix_widths, "halving": halving})  # fmt: skip
        self.config: Optional[DictConfig] = None
        self.context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # the task function is not called (packs train); the per-job callbacks are told of it
        self.context, self.config, self.task_function = hydra_context, config, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        return launch(
            self.settings, self.context, self.config, job_overrides, initial_job_idx, self.task_function
        )

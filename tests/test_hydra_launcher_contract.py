"""`hydra/launcher=packed` keeps Hydra's launcher contract for any Hydra app: Hydra's own
conformance suite for launchers (the one Hydra's submitit and Ray launchers run), with
`launcher_name="packed"`. Its jobs are not ptlab runs, so the launcher launches them as Hydra's
basic launcher would; ptlab's own runs are packed (tests/test_packed_sweeps.py).

The suite expects each job to run in its own folder, the default of the Hydra version its apps
name (1.1); `hydra.job.chdir=True` says so outright, since another test of the session may have
set Hydra's process-wide version base to a later one (where the default is to stay put)."""

from __future__ import annotations

import pytest
from hydra.test_utils.launcher_common_tests import LauncherTestSuite


@pytest.mark.parametrize("launcher_name, overrides", [("packed", ["hydra.job.chdir=True"])])
class TestPackedLauncherKeepsHydrasContract(LauncherTestSuite):
    pass

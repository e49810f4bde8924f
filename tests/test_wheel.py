"""ptlab as a package: the wheel built from this checkout, installed into a fresh virtual
environment (no checkout on its path), runs ptlab-train --help, a tiny training run, ptlab-compare
and ptlab-eval from a folder outside the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import OFFLINE_ENV, REPO, TINY


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel; the dependencies come from this environment's
    site-packages through a .pth line (their .pth files, the editable install's among them, are
    not read there), so nothing is downloaded and the checkout is not importable."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(root / "dist"), str(REPO)], check=True, capture_output=True)  # fmt: skip
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "ptlab_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next((root / "dist").glob("ptlab-*.whl"))
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True)
    return venv


def run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE_ENV}
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_the_wheel_carries_conf_and_not_the_checkout(installed, tmp_path):
    where = run(installed, "python", "-c", "import ptlab, ptlab.config.compose as c; print(ptlab.__file__, c.CONF)",
                cwd=tmp_path)  # fmt: skip
    package, conf = where.stdout.split()
    assert str(REPO) not in package and Path(package).parent == Path(conf).parent
    assert (Path(conf) / "config.yaml").is_file() and (Path(conf) / "task" / "sst2.yaml").is_file()


def test_the_installed_console_scripts_train_compare_and_evaluate(installed, tmp_path):
    helped = run(installed, "ptlab-train", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "method: " in helped.stdout and "prompt_tuning" in helped.stdout
    run_dir = tmp_path / "run"
    trained = run(installed, "ptlab-train", "backbone=tiny_t5", *TINY, "trainer.max_steps=4",
                  "trainer.eval_every=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 4
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    compared = run(installed, "ptlab-compare", str(run_dir), "--out", str(tmp_path / "cmp"), "--no-plots",
                   cwd=tmp_path)  # fmt: skip
    assert compared.returncode == 0, compared.stderr[-2000:]
    assert "prompt_tuning" in (tmp_path / "cmp" / "table.md").read_text()
    sweep = tmp_path / "packed"  # Hydra finds ptlab's launcher plugin in the wheel
    packed = run(installed, "ptlab-train", "-m", "hydra/launcher=packed", "backbone=tiny_t5", *TINY,
                 "trainer.max_steps=2", "trainer.eval_every=2", "seed=0,1", f"hydra.sweep.dir={sweep}",
                 cwd=tmp_path)  # fmt: skip
    assert packed.returncode == 0, packed.stderr[-2000:]
    assert "pack of 2 runs on tiny_t5" in packed.stdout and (sweep / "1" / "summary.json").is_file()
    evaluated = run(installed, "ptlab-eval", str(run_dir), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    best = summary["best"]["acc"]
    assert f"{best:.4f}" in evaluated.stdout or f"{100 * best:.1f}" in evaluated.stdout, evaluated.stdout

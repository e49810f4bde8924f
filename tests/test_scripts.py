"""The scripts in scripts/ run end to end (on tiny models; their real numbers are in docs/results)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import OFFLINE_ENV, REPO


def script(*args, timeout=600):
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_bench_prints_ratios_and_writes_json(tmp_path):
    result = script(
        "scripts/bench.py",
        "--backbones",
        "tiny_t5",
        "--repeats",
        "1",
        "--tta-target",
        "0",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| tiny_t5: train step, examples/s |" in result.stdout and "SMoP 4x5 vs PT-100" in result.stdout
    (report,) = tmp_path.glob("bench-cpu-*.json")
    data = json.loads(report.read_text())
    assert set(data["tiny_t5"]["train_s"]) == {"ptlab", "peft"} and data["matmul_flops_per_s"] > 0


def test_compare_writes_a_table_with_every_arm(tmp_path):
    out = tmp_path / "fpt.md"
    result = script(
        "scripts/compare.py",
        "fpt",
        "--backbone",
        "tiny_t5",
        "--seeds",
        "0",
        "--steps",
        "5",
        "--eval-examples",
        "16",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--out",
        str(out),
        "--extra",
        "data.max_train_examples=64",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    for arm in ("prompt tuning, constant", "FPT-LD (depth)", "FPT-FR (width)", "FPT-CR (compound)"):
        assert f"| {arm} |" in table
    assert len(list((tmp_path / "runs").rglob("summary.json"))) == 4

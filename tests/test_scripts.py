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
        "tiny_llama",
        "--repeats",
        "1",
        "--tta-target",
        "0.99",
        "--tta-max-steps",
        "2",
        "--tta-eval-every",
        "1",
        "--tta-peft-lrs",
        "0.03",
        "--grouping-batches",
        "2",
        "--eval-examples",
        "4",
        "--no-compile",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for row in (
        "| tiny_t5: train step, examples/s |",
        "| tiny_t5: SMoP 4x5 vs PT-100 peak memory over the loaded model |",
        "| tiny_t5: deep_prompt vs PT-20 time (20 positions per layer vs 20 input tokens) |",
        "| tiny_llama: train step, prompt states shared vs per example |",
        "| minilm_l6: SST-2 train, examples/s, length-grouped vs random batches (2 each) |",
        "| minilm_l6: time to 99% SST-2 accuracy (PEFT at lr 0.03) | not reached in 2 steps",
    ):
        assert row in result.stdout
    (report,) = tmp_path.glob("bench-cpu-*.json")
    data = json.loads(report.read_text())
    assert set(data["tiny_t5"]["train_s"]) == {"ptlab", "peft"} and data["tiny_t5"]["matmul_flops_per_s"] > 0
    assert all(value > 0 for value in data["tiny_llama"]["step_memory_mb"].values())
    assert data["tiny_llama"]["methods_s"]["deep_prompt"] > 0
    assert data["real_eval"]["examples"] == 4 and 0.0 <= data["real_eval"]["same_generated_text"] <= 1.0
    assert data["time_to_accuracy"]["peft"]["0.03"]["examples_per_s"] > 0
    padding = data["length_grouping"]["padding_fraction"]
    assert padding["grouped"] < padding["plain"]


def test_compare_preset_runs_its_experiment_and_tables_it(tmp_path):
    runs = tmp_path / "runs"
    overrides = ["backbone=tiny_t5", "seed=0", "trainer.max_steps=4", "trainer.eval_every=2",
                 "data.max_eval_examples=16", "data.max_train_examples=64", "schedule.score_examples=16"]  # fmt: skip
    result = script("scripts/compare.py", "fpt", "--runs-dir", str(runs), *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (runs / "compare" / "table.md").read_text()
    for schedule in ("constant", "fpt_depth", "fpt_width", "fpt"):
        assert f"| {schedule} |" in table
    assert "Difference to **constant**" in table and "Made by `python scripts/compare.py fpt" in table
    assert len(list(runs.glob("*/summary.json"))) == 4 and (runs / "compare" / "curves_sst2.png").exists()

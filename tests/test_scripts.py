"""The scripts in scripts/ run end to end (on tiny models; their real numbers are in docs/results)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

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


def test_bench_packed_sweeps_table_their_ratios_and_equal_their_runs_alone(tmp_path):
    """`--quick --sections packed`: tiny T5, K = 1, 2 (4 steps, batch 8) and K = 2 at the config's
    batch (32); only this section runs, each row has its ratio, and every packed run ends as alone
    (dropout off, fp32 CPU: best validation and last training loss within 1e-5)."""
    result = script("scripts/bench.py", "--quick", "--sections", "packed", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for line in result.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| tiny_t5: ") and len(cells) == 4:
            rows[cells[0]] = cells[1:]
    assert "| measurement (cpu) | ptlab | reference | ratio |" in result.stdout
    assert not any("train step" in label for label in rows)  # the other sections did not run
    for size, batch in ((1, 8), (2, 8), (2, 32)):
        what = f"tiny_t5: sweep of K={size} PT-20 runs (4 steps, batch {batch})"
        packed, alone, ratio = rows[
            f"{what}, wall s (load + tokenize + train + eval), packed vs one after another"
        ]
        assert packed.endswith(" s") and alone.endswith(" s") and re.fullmatch(r"\d+\.\d\dx faster", ratio)
        _, _, ratio = rows[f"{what}, training examples/s, packed vs one after another"]
        assert re.fullmatch(r"\d+\.\d\dx", ratio)
        packed, alone, ratio = rows[f"{what}, peak memory, the pack vs its largest run alone"]
        assert packed.endswith(" MiB") and re.fullmatch(r"\d+\.\d\dx", ratio)
        share = next(label for label in rows if label.startswith(f"{what}, training FLOPs/s as a share of the matmul floor"))
        packed, alone, ratio = rows[share]
        assert packed.endswith("%") and alone.endswith("%") and re.fullmatch(r"\d+\.\d\dx", ratio)
    label = next(label for label in rows if "each run packed vs alone" in label)
    assert rows[label][2] == "equal within 1e-5"

    (report,) = tmp_path.glob("bench-cpu-*.json")
    sweeps = json.loads(report.read_text())["packed_sweep"]["tiny_t5"]
    assert set(sweeps) == {"k1_batch8", "k2_batch8", "k2_batch32"}
    for key, sweep in sweeps.items():
        alone, packed = sweep["alone"], sweep["packed"]
        size = int(key[1])
        assert len(alone["best"]) == len(packed["best"]) == size and None not in packed["best"]
        assert 0 < packed["floor_share"] < 1 and 0 < alone["floor_share"] < 1
        assert packed["best"] == pytest.approx(alone["best"], abs=1e-5)
        losses = [[run["last_train_loss"] for run in arm["runs"]] for arm in (packed, alone)]
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
        if size == 2:
            assert losses[1][0] != losses[1][1]  # the two runs differ (seed, lr), so the check has teeth
        # the pack's members share its training time: the sweep's rate is all examples over it once
        seconds = [run["train_seconds"] for run in packed["runs"]]
        examples = sum(run["examples_per_s"] * run["train_seconds"] for run in packed["runs"])
        assert packed["examples_per_s"] == pytest.approx(examples / max(seconds))
        assert packed["wall_s"] > 0 and alone["wall_s"] > 0


def test_compare_preset_runs_its_experiment_and_tables_it(tmp_path):
    runs = tmp_path / "runs"
    overrides = ["backbone=tiny_t5", "seed=0", "trainer.max_steps=4", "trainer.eval_every=2",
                 "data.max_eval_examples=16", "data.max_train_examples=64", "stages.score_examples=16"]  # fmt: skip
    result = script("scripts/compare.py", "fpt", "--runs-dir", str(runs), *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (runs / "compare" / "table.md").read_text()
    for schedule in ("constant", "fpt_depth", "fpt_width", "fpt"):
        assert f"| {schedule} |" in table
    assert "Difference to **constant**" in table and "Made by `python scripts/compare.py fpt" in table
    assert len(list(runs.glob("*/summary.json"))) == 4 and (runs / "compare" / "curves_sst2.png").exists()


def test_bench_dropout_tables_what_each_member_adds():
    """A pack's dropout on tiny T5 at K = 1, 2: a row per K, a second member adds no ops of its own
    (every row's masks are addressed in one set of tensor ops), and the memory held for the
    backward grows with the rows and is larger with dropout on (its masks, eager attention)."""
    result = script("scripts/bench_dropout.py", "--backbones", "tiny_t5", "--sizes", "1", "2", "--repeats", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| tiny_t5 |")]
    assert [int(cells[1]) for cells in rows] == [1, 2]
    added = [float(cells[6]) for cells in rows]
    assert 0 < added[0] == added[1]
    held = [(float(cells[7]), float(cells[8])) for cells in rows]
    assert all(0 < off < on for off, on in held) and held[1][0] > held[0][0] and held[1][1] > held[0][1]


def test_bench_commits_times_a_commit_against_the_tree():
    """The solo-speed comparison with another commit: a worktree of HEAD against this tree, one
    real `ptlab-train` run each on tiny T5, dropout on; the table has the row and its ratios."""
    result = script(
        "scripts/bench_commits.py", "--base", "HEAD", "--setups", "tiny_t5 + sst2, batch 8", "--dropout", "on",
        "--repeats", "1", "--steps", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("| tiny_t5 + sst2, batch 8, dropout on |")]
    cells = row.strip("|").split("|")
    assert float(cells[1]) > 0 and float(cells[2]) > 0 and cells[3].strip().endswith("x")


def test_bench_pack_ops_tables_a_packs_ops_and_time_per_step_against_a_commit(tmp_path):
    """The packed-sweep step cost as K grows, a worktree of HEAD against this tree: real packed
    sweeps of K = 1, 2 on tiny T5 (dropout on) for each, ATen ops and ms per step in one table, every
    member's pack_size checked to be K, and K = 2 costs more ops than K = 1 on both sides; `--set`
    reaches every sweep (a key ptlab does not know would fail it)."""
    out = tmp_path / "ops.json"
    result = script("scripts/bench_pack_ops.py", "--quick", "--base", "HEAD", "--json", str(out),
                    "--set", "data.max_source_length=48")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data.max_source_length=48; " in result.stdout
    rows = [line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| tiny_t5 | on |")]
    assert [int(cells[3]) for cells in rows] == [1, 2] and {cells[2].strip() for cells in rows} == {"prompt_tuning"}
    for cells in rows:
        base_ops, here_ops, base_ms, here_ms = (float(cells[i]) for i in (4, 5, 9, 10))
        assert base_ops > 0 and here_ops > 0 and base_ms > 0 and here_ms > 0
        assert cells[6].strip().endswith("x") and cells[11].strip().endswith("x")
    assert [cells[7].strip() for cells in rows][0] == "1.00x" == [cells[8].strip() for cells in rows][0]
    data = json.loads(out.read_text())
    for row in data["rows"]:
        for side in ("base", "here"):
            assert row[side]["pack_size"] == [row["cell"]["size"]]
    k1, k2 = data["rows"]
    for side in ("base", "here"):
        assert 0 < k1[side]["ops_per_step"] < k2[side]["ops_per_step"]


def test_halving_proof_tables_halving_against_the_grid(tmp_path):
    """The SMoP sweep alone (the AdamW arms' sweep is the same code with other recipes and lrs)."""
    out = tmp_path / "out"
    result = script("scripts/halving_proof.py", "--backbone", "tiny_t5", "--steps", "9", "--eval-every", "9",
                    "--train-examples", "64", "--eval-examples", "16", "--sweeps", "smop",
                    "--work", str(tmp_path / "work"), "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = (out / "table.md").read_text()
    steps = re.search(r"\| steps trained \| (\d+) \| (\d+) \| ([\d.]+) \|", table)
    # 6 lrs x 9 steps; halving: 6 to step 1, 2 to step 3, 1 to step 9
    assert steps.groups() == ("54", str(6 * 1 + 2 * 2 + 1 * 6), f"{16 / 54:.2f}")
    assert "| smop |" in table and "| pt20 |" not in table
    worst = float(re.search(r"its grid run's: ([\d.e+-]+)", table).group(1))
    assert worst < 1e-5
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs["grid"]) == len(runs["halving"]) == 6
    assert (out / "halving_smop.json").exists() and not (out / "halving_adamw.json").exists()

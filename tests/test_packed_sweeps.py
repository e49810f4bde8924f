"""Packed sweeps (ptlab/training/pack.py): every member of a pack ends where its run alone ends.

With the frozen network's dropout off, a member's metrics.jsonl (losses, lr, validation metrics)
and its trained prompt equal the same job run alone within 1e-5 (fp32, CPU, ~10 steps), whatever
else the pack holds: other methods, prompt lengths, learning rates, seeds, batch sizes, step
counts, gradient accumulation and another task.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from safetensors.torch import load_file

from ptlab.config.schema import to_object
from ptlab.training import pack as pack_module
from ptlab.training.job import run
from ptlab.training.packed_job import PackedJob, run_group
from ptlab.training.packing import group_jobs, packing_report
from ptlab.training.run_folder import RunFacts, read_summary

from conftest import TINY, compose_config

COMMON = [*TINY, "backbone.dropout=false", "trainer.log_every=1"]
# one pack: PT-20, PT-100, SMoP, SuperPos, Residual and deep prompts; lrs, seeds, batch sizes, step
# counts, grad accumulation and eval cadence differ, and one member trains another task
MEMBERS = [
    ["method=prompt_tuning", "method.prompt_length=20", "trainer.lr=0.3", "seed=0", "trainer.batch_size=8",
     "trainer.max_steps=10", "trainer.eval_every=5"],
    ["method=pt100", "trainer.lr=0.03", "seed=1", "trainer.batch_size=4", "trainer.max_steps=8",
     "trainer.eval_every=4"],
    ["method=smop", "trainer.lr=0.1", "seed=2", "trainer.batch_size=6", "trainer.max_steps=10",
     "trainer.eval_every=5", "trainer.grad_accum=2"],
    ["method=superpos", "trainer.lr=0.05", "seed=3", "trainer.batch_size=8", "trainer.max_steps=6",
     "trainer.eval_every=3"],
    ["method=residual", "trainer.lr=0.2", "seed=4", "trainer.batch_size=5", "trainer.max_steps=10",
     "trainer.eval_every=10", "task=rte_glue"],
    ["method=deep_prompt", "trainer.lr=0.1", "seed=5", "trainer.batch_size=8", "trainer.max_steps=9",
     "trainer.eval_every=3", "trainer.optimizer=adafactor"],
]  # fmt: skip
COMPARED = ("loss", "lr", "acc")


def job(overrides: List[str], run_dir: Path) -> PackedJob:
    cfg = compose_config(overrides)
    return PackedJob(cfg, to_object(cfg), RunFacts(run_dir=run_dir))


def events(run_dir: Path) -> List[Dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def exported(run_dir: Path) -> Dict[str, torch.Tensor]:
    """The trained prompt, as the run exports it (SuperPos: the superposed prompt, not its factors)."""
    return load_file(run_dir / "checkpoints" / "best" / "export.safetensors")


def last(run_dir: Path) -> Dict:
    return torch.load(run_dir / "checkpoints" / "last" / "state.pt", weights_only=False)


def assert_close_in_norm(mine: Dict[str, torch.Tensor], theirs: Dict[str, torch.Tensor], tolerance: float) -> None:
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        if value.is_floating_point():
            difference = float((mine[key].double() - value.double()).norm())
            assert difference <= tolerance * float(value.double().norm()), (key, difference)


def assert_same_run(packed: Path, alone: Path, tolerance: float = 1e-5) -> None:
    """Same events (step, split, losses, lr, metrics) and the same trained prompt, relative 1e-5.
    The raw trainable tensors of the last checkpoint agree to 1e-4: Adam's first steps on a
    zero-initialised parameter (SuperPos's delta) are sign-like, so a near-zero gradient element
    carries its rounding into the update."""
    a, b = events(packed), events(alone)
    assert [(e["step"], e["split"]) for e in a] == [(e["step"], e["split"]) for e in b]
    for x, y in zip(a, b):
        for key in COMPARED:
            if key in y:
                assert x[key] == pytest.approx(y[key], rel=tolerance, abs=1e-7), (packed, x["step"], key)
    assert_close_in_norm(exported(packed), exported(alone), tolerance)
    assert_close_in_norm(last(packed)["trainable"], last(alone)["trainable"], 10 * tolerance)
    assert read_summary(packed)["steps"] == read_summary(alone)["steps"]


@pytest.mark.parametrize("backbone", ["tiny_t5", "tiny_llama", "tiny_bert"])
def test_each_member_of_a_mixed_pack_equals_its_run_alone(tmp_path, backbone):
    overrides = [[*COMMON, f"backbone={backbone}", *member] for member in MEMBERS]
    jobs = [job(o, tmp_path / "packed" / str(i)) for i, o in enumerate(overrides)]
    assert len(group_jobs([j.config for j in jobs])) == 1  # one backbone setup: one group
    results = run_group(jobs, pack_size=None)
    for i, member in enumerate(overrides):
        alone = run(compose_config(member), run_dir=tmp_path / "alone" / str(i))
        assert results[i] == pytest.approx(alone, rel=1e-6)
        assert_same_run(tmp_path / "packed" / str(i), tmp_path / "alone" / str(i))


def test_a_member_that_fails_fails_alone(tmp_path):
    """A non-finite loss ends one member with its one-line error; the others finish as alone."""
    base = [*COMMON, "backbone=tiny_t5", "trainer.max_steps=6", "trainer.eval_every=3"]
    bad = [*base, "trainer.lr=1e30", "seed=1"]
    jobs = [job([*base, "seed=0"], tmp_path / "0"), job(bad, tmp_path / "1"), job([*base, "seed=2"], tmp_path / "2")]
    results = run_group(jobs, pack_size=3)
    assert results[1] is None and results[0] is not None and results[2] is not None
    failure = json.loads((tmp_path / "1" / "failure.json").read_text())
    assert "training loss is" in failure["error"] and "lower trainer.lr" in failure["error"]
    assert read_summary(tmp_path / "1")["status"] == "failed"
    run(compose_config([*base, "seed=2"]), run_dir=tmp_path / "alone2")
    assert_same_run(tmp_path / "2", tmp_path / "alone2")


def test_a_pack_out_of_memory_says_which_size_fits(tmp_path, monkeypatch, capsys):
    base = [*COMMON, "backbone=tiny_t5", "trainer.max_steps=6", "trainer.eval_every=2"]
    jobs = [job([*base, f"seed={seed}"], tmp_path / str(seed)) for seed in range(4)]
    real_step, calls = pack_module.Pack.step, []

    def step(self, members):  # the third packed step does not fit
        calls.append(len(members))
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, members)

    monkeypatch.setattr(pack_module.Pack, "step", step)
    assert run_group(jobs, pack_size=4) == [None] * 4
    err = capsys.readouterr().err
    assert err.count("a pack of 4 runs ran out of memory") == 4
    assert "hydra.launcher.pack_size=2" in err
    for seed in range(4):  # each member keeps the checkpoint of its step-2 evaluation
        assert last(tmp_path / str(seed))["train_state"]["step"] == 2


def test_the_report_says_why_jobs_are_in_other_packs():
    configs = [
        to_object(compose_config([*COMMON, "backbone=tiny_t5", f"seed={seed}"])) for seed in range(3)
    ] + [
        to_object(compose_config([*COMMON, "backbone=tiny_llama"])),
        to_object(compose_config([*COMMON, "backbone=tiny_t5", "schedule=fpt_depth"])),
        to_object(compose_config([*COMMON, "backbone=tiny_t5", "backbone.dropout=true"])),
    ]
    groups = group_jobs(configs)
    assert [g.jobs for g in groups] == [[0, 1, 2], [3], [4], [5]]
    lines = packing_report(groups, [2, 1, 1, 1], list(range(10, 16)))
    assert lines[0] == "pack 1: jobs 10,11 (2 runs)"
    assert lines[1] == "pack 2: jobs 12 (1 runs): pack_size=2"
    assert "backbone.name=\"tiny_t5\" vs \"tiny_llama\"" in lines[2]
    assert "alone: schedule=fpt_depth changes the backbone" in lines[3]
    assert "backbone.dropout=false vs true" in lines[4]

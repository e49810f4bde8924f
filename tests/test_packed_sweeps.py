"""Packed sweeps (ptlab/training/loop.py): every member of a pack ends where its run alone ends.

With the frozen network's dropout on (the default: each run draws its own masks) or off, a
member's metrics.jsonl (losses, lr, validation metrics) and its trained prompt equal the same job
run alone within 1e-5 (fp32, CPU, ~10 steps), whatever else the pack holds: other methods, prompt
lengths, learning rates, seeds, batch sizes, step counts, gradient accumulation and another task.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
from safetensors.torch import load_file
from test_scale_out import cli

from ptlab.cli.compare import main as compare_main
from ptlab.cli.tools import eval_main
from ptlab.config.schema import to_object
from ptlab.methods.smop import SMoP
from ptlab.model.partial import PartialModel
from ptlab.sweep.grouping import group_jobs
from ptlab.sweep.plan import packing_report, plan_packs
from ptlab.training import loop
from ptlab.training.job import Job, run, run_jobs
from ptlab.training.run_folder import RunFacts, read_summary
from ptlab.training.trainer import Trainer

from conftest import OFFLINE_ENV, REPO, TINY, compose_config

COMMON = [*TINY, "trainer.log_every=1"]  # the frozen network's dropout on, as by default
# one pack: PT-20, PT-100, SMoP (learned and stochastic routing), SuperPos, Residual and deep prompts; lrs, seeds, batch sizes, step
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
    # two draws and a consistency loss: its own passes within the packed step (loss_in_one_pass)
    ["method=smop", "method.routing=stochastic", "trainer.lr=0.1", "seed=6", "trainer.batch_size=4",
     "trainer.max_steps=6", "trainer.eval_every=3"],
]  # fmt: skip
COMPARED = ("loss", "lr", "acc")


def job(overrides: List[str], run_dir: Path) -> Job:
    cfg = compose_config(overrides)
    return Job(cfg, to_object(cfg), RunFacts(run_dir=run_dir))


def events(run_dir: Path) -> List[Dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def exported(run_dir: Path) -> Dict[str, torch.Tensor]:
    """The trained prompt, as the run exports it (SuperPos: the superposed prompt, not its factors)."""
    return load_file(run_dir / "checkpoints" / "best" / "export.safetensors")


def last(run_dir: Path) -> Dict:
    return torch.load(run_dir / "checkpoints" / "last" / "state.pt", weights_only=False)


def assert_close_in_norm(
    mine: Dict[str, torch.Tensor], theirs: Dict[str, torch.Tensor], tolerance: float
) -> None:
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        if value.is_floating_point():
            difference = float((mine[key].double() - value.double()).norm())
            assert difference <= tolerance * float(value.double().norm()), (key, difference, difference / float(value.double().norm()))


def assert_same_run(
    packed: Path, alone: Path, tolerance: float = 1e-5, resumed_at: int = 0, prompt_tolerance: Optional[float] = None
) -> None:
    """Same events (step, split, losses, lr, metrics) and the same trained prompt, relative 1e-5.
    The raw trainable tensors of the last checkpoint agree to 1e-4: Adam's first steps on a
    zero-initialised parameter (SuperPos's delta) are sign-like, so a near-zero gradient element
    carries its rounding into the update. A run resumed at step `resumed_at` logs its stage (FPT)
    there again."""
    a = [e for e in events(packed) if not (e["split"] == "stage" and e["step"] == resumed_at > 0)]
    b = events(alone)
    assert [(e["step"], e["split"]) for e in a] == [(e["step"], e["split"]) for e in b]
    for x, y in zip(a, b):
        for key in COMPARED:
            if key in y:
                assert x[key] == pytest.approx(y[key], rel=tolerance, abs=1e-7), (packed, x["step"], key)
    prompt_tolerance = prompt_tolerance or tolerance
    assert_close_in_norm(exported(packed), exported(alone), prompt_tolerance)
    assert_close_in_norm(last(packed)["trainable"], last(alone)["trainable"], 10 * prompt_tolerance)
    assert read_summary(packed)["steps"] == read_summary(alone)["steps"]


@pytest.mark.parametrize(
    "backbone, dropout",
    [("tiny_t5", True), ("tiny_llama", True), ("tiny_bert", True), ("tiny_t5", False), ("tiny_llama", False)],
)
def test_each_member_of_a_mixed_pack_equals_its_run_alone(tmp_path, backbone, dropout):
    """Dropout on: each member's masks are its own (its losses equal its run alone's to 1e-5, so
    the masks are the same); off: causal packs run shared prompts once per batch."""
    # one thread: the pack's and the runs' reductions split alike; with two, a BERT prompt ends 1.004e-5
    # (relative, in norm) from its run alone after 10 steps
    switch = f"backbone.dropout={str(dropout).lower()}"
    overrides = [[*COMMON, f"backbone={backbone}", switch, "hardware.num_threads=1", *m] for m in MEMBERS]
    jobs = [job(o, tmp_path / "packed" / str(i)) for i, o in enumerate(overrides)]
    assert len(group_jobs([j.config for j in jobs], mix_widths=True)) == 1  # one backbone setup: one group
    results = run_jobs(jobs, pack_size=None)
    for i, member in enumerate(overrides):
        alone = run(compose_config(member), run_dir=tmp_path / "alone" / str(i))
        assert results[i] == pytest.approx(alone, rel=1e-6)
        # SuperPos on BERT with dropout on: its prompt ends 2.0e-5 from alone in fp32 (relative, in
        # norm: its zero-initialised delta's first Adam steps are sign-like); in float64 the pack's
        # gradients equal alone's (tests/test_mixed_rows.py), so this is rounding, not masks
        loose = dropout and backbone == "tiny_bert" and "method=superpos" in member
        assert_same_run(tmp_path / "packed" / str(i), tmp_path / "alone" / str(i), prompt_tolerance=5e-5 if loose else None)


@pytest.mark.parametrize("backbone", ["tiny_t5", "tiny_llama", "tiny_bert"])
@pytest.mark.parametrize("method", [
    ["method=prompt_tuning", "method.prompt_length=5"], ["method=superpos"], ["method=residual"],
    ["method=smop"], ["method=deep_prompt", "method.prompt_length=4"],
], ids=lambda m: m[0].split("=")[1])  # fmt: skip
def test_a_member_whose_packmates_share_its_width_and_batches_is_its_run_alone_bit_for_bit(tmp_path, backbone, method):
    """Runs of one seed, task and method at other lrs (an lr search: the same batches, the same
    prompt width, as `hydra.launcher.mix_widths=false` packs them): every logged number and every
    trained tensor of a member is its run alone's, to the bit, with dropout on. Nothing in a pass
    sums a row's numbers in an order that depends on the pack: rows go through their own run's
    head and router one product each, gradients gather by index_add, a lone prompt is mapped as a
    pair, and evaluation batches are each run's own."""
    base = [*COMMON, f"backbone={backbone}", *method, "seed=3", "trainer.max_steps=6", "trainer.eval_every=2"]
    members = [[*base, f"trainer.lr={lr}"] for lr in (0.3, 0.03, 0.1)]
    jobs = [job(o, tmp_path / "packed" / str(i)) for i, o in enumerate(members)]
    assert len(group_jobs([j.config for j in jobs])) == 1
    run_jobs(jobs, pack_size=None)
    alone = tmp_path / "alone"
    run(compose_config(members[1]), run_dir=alone)
    assert events(tmp_path / "packed" / "1") == [{**e, **{k: v for k, v in events(tmp_path / "packed" / "1")[i].items()
                                                        if k.endswith("_s") or k == "examples_per_s"}}
                                                 for i, e in enumerate(events(alone))]  # fmt: skip
    for mine, theirs in ((exported(tmp_path / "packed" / "1"), exported(alone)),
                         (last(tmp_path / "packed" / "1")["trainable"], last(alone)["trainable"])):  # fmt: skip
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[key], theirs[key]) for key in theirs)


@pytest.mark.parametrize("backbone", ["tiny_t5", "tiny_llama"])
def test_fpt_members_with_one_stage_plan_train_in_one_pack_each_as_alone(tmp_path, monkeypatch, backbone):
    """FPT-CR members of one seed at other lrs, optimizers and eval cadences train together, each
    equal to its run alone; a member resumed at step 8 (another stage than its packmates at step 0)
    trains after them, on its own stage, and ends equal to its uninterrupted run."""
    base = [*COMMON, f"backbone={backbone}", "stages=fpt", "trainer.max_steps=10"]
    members = [
        [*base, "trainer.lr=0.3", "trainer.eval_every=4"],
        [*base, "trainer.lr=0.1", "trainer.eval_every=2", "trainer.optimizer=adafactor"],
        [*base, "trainer.lr=0.03", "trainer.eval_every=5"],
        [*base, "trainer.lr=0.2", "trainer.eval_every=4"],
    ]
    real_count = Trainer.count_step

    def cut_at_step_9(self, *args):
        if self.state.step == 9:
            raise KeyboardInterrupt
        return real_count(self, *args)

    monkeypatch.setattr(Trainer, "count_step", cut_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        run(compose_config(members[3]), run_dir=tmp_path / "packed" / "3")
    monkeypatch.undo()
    assert last(tmp_path / "packed" / "3")["train_state"]["step"] == 8
    jobs = [job(o, tmp_path / "packed" / str(i)) for i, o in enumerate(members)]
    assert len(group_jobs([j.config for j in jobs])) == 1
    scorings, real_score = [], PartialModel.score_neurons

    def score_neurons(self, run_batches):
        scorings.append(len(scorings))
        return real_score(self, run_batches)

    monkeypatch.setattr(PartialModel, "score_neurons", score_neurons)
    results = run_jobs(jobs, pack_size=None)
    monkeypatch.undo()
    for i, member in enumerate(members):
        alone = run(compose_config(member), run_dir=tmp_path / "alone" / str(i))
        assert results[i] == pytest.approx(alone, rel=1e-6)
        resumed_at = 8 if i == 3 else 0
        assert_same_run(tmp_path / "packed" / str(i), tmp_path / "alone" / str(i), resumed_at=resumed_at)
        stages = [e["step"] for e in events(tmp_path / "packed" / str(i)) if e["split"] == "stage"]
        assert stages == [0, 2, 4, 6] + ([8] if resumed_at else [])
        assert read_summary(tmp_path / "packed" / str(i))["pack_size"] == (1 if resumed_at else 3)  # its part's
        scores = [torch.load(tmp_path / where / str(i) / "ffn_scores.pt") for where in ("packed", "alone")]
        assert all(torch.equal(a, b) for a, b in zip(*scores))
    assert scorings == [0]  # member 0 ranked the neurons; 1 and 2 took its scores, 3 had its own


def test_a_member_that_fails_fails_alone(tmp_path):
    """A non-finite loss ends one member with its one-line error; the others finish as alone."""
    base = [*COMMON, "backbone=tiny_t5", "trainer.max_steps=6", "trainer.eval_every=3"]
    bad = [*base, "trainer.lr=1e30", "seed=1"]
    jobs = [
        job([*base, "seed=0"], tmp_path / "0"),
        job(bad, tmp_path / "1"),
        job([*base, "seed=2"], tmp_path / "2"),
    ]
    results = run_jobs(jobs, pack_size=3)
    assert results[1] is None and results[0] is not None and results[2] is not None
    failure = json.loads((tmp_path / "1" / "failure.json").read_text())
    assert "training loss is" in failure["error"] and "lower trainer.lr" in failure["error"]
    assert read_summary(tmp_path / "1")["status"] == "failed"
    run(compose_config([*base, "seed=2"]), run_dir=tmp_path / "alone2")
    assert_same_run(tmp_path / "2", tmp_path / "alone2")


@pytest.mark.parametrize("phase", ["checkpoint", "tracker", "summary"])
def test_a_fault_in_one_members_own_work_ends_that_member_alone(tmp_path, monkeypatch, phase):
    """A real fault in member 1's own work (its checkpoint folder is a file; its metrics.jsonl is a
    folder; its summary cannot be recorded) ends it with its failure.json and one line, and the
    other members finish as alone."""
    base = [*COMMON, "backbone=tiny_t5", "trainer.max_steps=6", "trainer.eval_every=3"]
    jobs = [job([*base, f"seed={seed}"], tmp_path / str(seed)) for seed in range(3)]
    (tmp_path / "1").mkdir()
    if phase == "checkpoint":
        (tmp_path / "1" / "checkpoints").write_text("not a folder")
    elif phase == "tracker":
        (tmp_path / "1" / "metrics.jsonl").mkdir()
    else:
        close_run = loop.close_run

        def close_run_but_not_member_1(run, summary, rung=None):
            if run.run_dir == tmp_path / "1":
                raise OSError(f"no space left on device: {run.run_dir / 'summary.json'}")
            return close_run(run, summary, rung)

        monkeypatch.setattr(loop, "close_run", close_run_but_not_member_1)
    results = run_jobs(jobs, pack_size=3)
    assert results[1] is None and results[0] is not None and results[2] is not None
    failure = json.loads((tmp_path / "1" / "failure.json").read_text())
    assert failure["status"] == "failed" and failure["error"]
    assert all(read_summary(tmp_path / str(i))["status"] == "finished" for i in (0, 2))
    if phase == "checkpoint":
        run(compose_config([*base, "seed=2"]), run_dir=tmp_path / "alone2")
        assert_same_run(tmp_path / "2", tmp_path / "alone2")


@pytest.mark.parametrize("phase", ["injection", "loss", "evaluation"])
def test_a_fault_in_one_members_part_of_the_joint_pass_ends_that_member_alone(tmp_path, monkeypatch, phase):
    """Member 1's method (SMoP, the others prompt tuning) raises from its 4th training step on, in
    its injection or its loss, or in its evaluation passes after that: the pack cannot tell whose
    the error is, so its members train again one by one from their last checkpoints; member 1
    fails alone and the others end as alone."""
    base = [*COMMON, "backbone=tiny_t5", "trainer.max_steps=6", "trainer.eval_every=3"]
    jobs = [job([*base, f"seed={seed}", "method=smop" if seed == 1 else "method=prompt_tuning"],
                tmp_path / str(seed)) for seed in range(3)]  # fmt: skip
    trained = []
    forward, extra_loss = SMoP.forward, SMoP.extra_loss

    def faulty(method):
        if method.training:
            trained.append(1)
        if (phase == "injection" and method.training and len(trained) > 3) or (
            phase == "evaluation" and not method.training and len(trained) > 3
        ):
            raise RuntimeError(f"member 1's {phase} broke")

    def faulty_forward(self, *args, **kwargs):  # alone
        faulty(self)
        return forward(self, *args, **kwargs)

    def faulty_together(cls, methods, *args, **kwargs):  # in a pack, SMoP members route their rows together
        faulty(methods[0])
        return together(methods, *args, **kwargs)

    def faulty_extra_loss(self):
        if phase == "loss" and len(trained) > 3:
            raise RuntimeError("member 1's loss broke")
        return extra_loss(self)

    together = SMoP.inject_together
    monkeypatch.setattr(SMoP, "forward", faulty_forward)
    monkeypatch.setattr(SMoP, "inject_together", classmethod(faulty_together))
    monkeypatch.setattr(SMoP, "extra_loss", faulty_extra_loss)
    results = run_jobs(jobs, pack_size=3)
    assert results[1] is None and results[0] is not None and results[2] is not None
    failure = json.loads((tmp_path / "1" / "failure.json").read_text())
    assert f"member 1's {phase} broke" in failure["error"]
    assert all(read_summary(tmp_path / str(i))["status"] == "finished" for i in (0, 2))
    monkeypatch.setattr(SMoP, "forward", forward)
    monkeypatch.setattr(SMoP, "inject_together", together)
    monkeypatch.setattr(SMoP, "extra_loss", extra_loss)
    run(compose_config([*base, "seed=2", "method=prompt_tuning"]), run_dir=tmp_path / "alone2")
    assert_same_run(tmp_path / "2", tmp_path / "alone2")


def test_a_pack_takes_the_next_job_as_a_member_leaves_each_member_as_alone(tmp_path, caplog):
    """7 mixed jobs in 3 slots: as members end (their step counts differ) the queued jobs join the
    running pack on the loaded backbone and its stacks (one of them from its own checkpoint, at
    step 3); every member equals its run alone."""
    overrides = [[*COMMON, "backbone=tiny_t5", "hardware.num_threads=1", *m] for m in MEMBERS]
    superpos = 3  # trained to step 3 before the sweep: it joins from its checkpoint
    run(compose_config([*overrides[superpos], "trainer.max_steps=3"]), run_dir=tmp_path / "packed" / str(superpos))
    jobs = [job(o, tmp_path / "packed" / str(i)) for i, o in enumerate(overrides)]
    caplog.set_level("INFO", logger="ptlab")
    results = run_jobs(jobs, pack_size=3)
    assert "backbone tiny_t5 loaded once for 7 runs" in caplog.text
    assert "pack of 3 runs on tiny_t5: training together, 4 more joining as slots free" in caplog.text
    assert caplog.text.count("joins the pack (3 of 3 slots)") == 4
    for i, member in enumerate(overrides):
        alone = run(compose_config(member), run_dir=tmp_path / "alone" / str(i))
        assert results[i] == pytest.approx(alone, rel=1e-6)
        assert read_summary(tmp_path / "packed" / str(i))["pack_size"] == 3
        assert_same_run(tmp_path / "packed" / str(i), tmp_path / "alone" / str(i), resumed_at=3 if i == superpos else 0)


def test_a_fault_in_a_refilling_pack_retrains_its_members_alone_and_its_queue_goes_on(tmp_path, monkeypatch, caplog):
    """The joint pass fails once in a pack of 2 slots with 3 jobs queued: its 2 members train again
    alone from their checkpoints, then the queue trains in 2 slots again; each equals its run alone."""
    base = [*COMMON, "backbone=tiny_t5", "trainer.max_steps=4", "trainer.eval_every=2"]
    jobs = [job([*base, f"seed={seed}"], tmp_path / str(seed)) for seed in range(5)]
    real_step, calls = loop.step, []

    def step(runs):
        calls.append(len(runs))
        if len(calls) == 3:
            raise RuntimeError("an error in the joint pass")
        return real_step(runs)

    monkeypatch.setattr(loop, "step", step)
    caplog.set_level("INFO", logger="ptlab")
    results = run_jobs(jobs, pack_size=2)
    assert all(value is not None for value in results)
    assert "a pack of 2 runs failed (an error in the joint pass)" in caplog.text and "in packs of 1" in caplog.text
    assert caplog.text.count("3 more joining as slots free") == 1 and "2 runs on tiny_t5: training together, 1 more joining" in caplog.text
    assert [read_summary(tmp_path / str(seed))["pack_size"] for seed in range(5)] == [1, 1, 2, 2, 2]
    for seed in (0, 4):
        run(compose_config([*base, f"seed={seed}"]), run_dir=tmp_path / f"alone{seed}")
        assert_same_run(tmp_path / str(seed), tmp_path / f"alone{seed}")


def test_a_pack_out_of_memory_halves_down_to_packs_that_fit(tmp_path, monkeypatch, caplog):
    """A step that does not fit (here: any with more than one run, from the third on) sends the
    members back to their last checkpoints; they train again as packs of half the size, then of
    one, and each ends equal to its run alone."""
    base = [*COMMON, "backbone=tiny_t5", "trainer.max_steps=6", "trainer.eval_every=2"]
    jobs = [job([*base, f"seed={seed}"], tmp_path / str(seed)) for seed in range(4)]
    real_step, calls = loop.step, []

    def step(runs):
        calls.append(len(runs))
        if len(runs) > 1 and len(calls) >= 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(runs)

    monkeypatch.setattr(loop, "step", step)
    results = run_jobs(jobs, pack_size=4)
    assert all(value is not None for value in results)
    err = caplog.text
    assert "a pack of 4 runs ran out of memory" in err and "in packs of 2" in err
    assert "a pack of 2 runs ran out of memory" in err and "in packs of 1" in err
    assert calls[:3] == [4, 4, 4] and 1 in calls and 2 in calls
    for seed in range(4):
        assert read_summary(tmp_path / str(seed))["pack_size"] == 1
    run(compose_config([*base, "seed=3"]), run_dir=tmp_path / "alone3")
    assert_same_run(tmp_path / "3", tmp_path / "alone3")


def test_the_report_says_why_jobs_are_in_other_packs():
    configs = [
        to_object(compose_config([*COMMON, "backbone=tiny_t5", f"seed={seed}"])) for seed in range(3)
    ] + [
        to_object(compose_config([*COMMON, "backbone=tiny_llama"])),
        to_object(compose_config([*COMMON, "backbone=tiny_t5", "stages=fpt_depth"])),
        to_object(compose_config([*COMMON, "backbone=tiny_t5", "backbone.dropout=false"])),
    ]
    groups = group_jobs(configs)
    assert [g.jobs for g in groups] == [[0, 1, 2], [3], [4], [5]]
    plan = plan_packs(groups, [2, 1, 1, 1], 1)
    lines = packing_report(groups, plan, [2, 1, 1, 1], 1, list(range(10, 16)))
    assert lines[0] == "pack 1: jobs 10,11 (2 runs)"
    assert lines[1] == "pack 2: jobs 12 (1 runs): 3 jobs in 2 packs (pack_size=2, 1 device)"
    assert "another backbone setup: backbone.family: 'seq2seq' -> 'causal'" in lines[2]
    assert "stages=fpt_depth: its partial models change the backbone at its own steps" in lines[3]
    assert "backbone.dropout: True -> False" in lines[4]


def test_runs_of_another_prompt_width_pack_apart_unless_widths_mix():
    """Rows of one width pad alike: an input block of 5, one of 3, per-layer prefixes of 5 are
    three groups (each pays no other's padding); `mix_widths` makes them one."""
    configs = [to_object(compose_config([*COMMON, "backbone=tiny_t5", *o])) for o in (
        ["method.prompt_length=5"], ["method.prompt_length=3"], ["method=smop", "method.prompt_length=5", "seed=1"],
        ["method=deep_prompt", "method.prompt_length=5"], ["method.prompt_length=3", "seed=2"])]  # fmt: skip
    groups = group_jobs(configs)
    assert [g.jobs for g in groups] == [[0, 2], [1, 4], [3]]
    assert groups[1].why.startswith("another prompt width (input block of 3): a pack holds one width")
    assert groups[2].why.startswith("another prompt width (prefixes of 5): ")
    assert [g.jobs for g in group_jobs(configs, mix_widths=True)] == [[0, 1, 2, 3, 4]]


def test_fpt_jobs_share_a_pack_only_when_their_partial_models_coincide():
    """FPT-CR's kept neurons come from its seed's untrained prompt: an lr grid of one seed is one
    group, another seed or step count is another; a depth-only schedule needs no scores."""

    def config(*overrides: str):
        return to_object(compose_config([*COMMON, "backbone=tiny_t5", "trainer.max_steps=10", *overrides]))

    configs = [
        config("stages=fpt", "trainer.lr=0.1"),
        config("stages=fpt", "trainer.lr=0.3", "trainer.optimizer=adafactor", "trainer.eval_every=3"),
        config("stages=fpt", "seed=1"),
        config("stages=fpt", "trainer.max_steps=12"),
        config("stages=fpt_depth", "seed=0"),
        config("stages=fpt_depth", "seed=1"),
        config(),
    ]
    groups = group_jobs(configs)
    assert [g.jobs for g in groups] == [[0, 1], [2], [3], [4, 5], [6]]
    assert [g.why for g in groups[1:]] == [
        "other partial models: stage plan.neuron scores.seed: 0 -> 1",
        "other partial models: stage plan.steps.max_steps: 10 -> 12",
        "other partial models: stages=fpt_depth",
        "",
    ]


# --- through the command line -------------------------------------------------------------------
def packed_sweep(sweep: Path, *overrides: str, **kwargs):
    return cli(
        ["-m", "hydra/launcher=packed", *TINY, f"hydra.sweep.dir={sweep}", *overrides], timeout=900, **kwargs
    )


def test_a_sweep_over_prompt_widths_packs_each_width_on_the_backbone_loaded_once(tmp_path):
    result = packed_sweep(tmp_path / "sweep", "backbone=tiny_t5", "logger=none", "trainer.max_steps=2",
                          "trainer.eval_every=2", "method.prompt_length=3,5", "trainer.lr=0.1,0.3")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pack 1: jobs 0,1 (2 runs)\n" in result.stdout
    assert "pack 2: jobs 2,3 (2 runs): another prompt width (input block of 5)" in result.stdout
    assert result.stdout.count("loaded once") == 1, result.stdout[-3000:]
    assert all(read_summary(tmp_path / "sweep" / str(job))["pack_size"] == 2 for job in range(4))


def test_a_packed_sweep_from_the_command_line(tmp_path, capsys):
    """Another backbone packs apart and the report says why; a failing member fails alone; each
    member has its own folder, log lines, W&B offline run and summary; a rerun skips finished
    members; ptlab-eval reads a packed run's folder as a solo run's."""
    sweep = tmp_path / "sweep"
    args = ["logger=wandb", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.lr=0.1,1e30",
            "backbone=tiny_t5,tiny_llama"]  # fmt: skip
    result = packed_sweep(sweep, *args, env_extra={"WANDB_MODE": "offline"})
    assert result.returncode == 1, result.stderr[-3000:]  # two failed jobs make the sweep fail, at its end
    assert "pack 1: jobs 0,2 (2 runs)" in result.stdout
    assert (
        "pack 2: jobs 1,3 (2 runs): another backbone setup: backbone.family: 'seq2seq' -> 'causal'"
        in result.stdout
    )
    assert "ptlab: error: 2 of 4 jobs failed" in result.stderr
    for job in (2, 3):
        assert "training loss is" in json.loads((sweep / str(job) / "failure.json").read_text())["error"]
    for job, packmate in ((0, 2), (2, 0)):  # a member's log has its own lines, not its packmate's
        log = (sweep / str(job) / "train.log").read_text()
        assert f"run folder {sweep / str(job)}" in log and f"run folder {sweep / str(packmate)}" not in log
    ids = set()
    for job in (0, 1):
        folder = sweep / str(job)
        summary = read_summary(folder)
        assert summary["status"] == "finished" and summary["steps"] == 4
        assert (folder / ".hydra" / "config.yaml").is_file() and (
            folder / ".hydra" / "overrides.yaml"
        ).is_file()
        wandb_id = summary["wandb"]["id"]
        assert len(list((folder / "wandb").glob(f"offline-run-*-{wandb_id}/run-{wandb_id}.wandb"))) == 1
        ids.add(wandb_id)
    assert len(ids) == 2
    assert result.stdout.count("loaded once") == 2  # one per backbone, not per pack
    again = packed_sweep(sweep, *args, env_extra={"WANDB_MODE": "offline"})
    assert again.stdout.count("already finished") == 2, again.stdout[-3000:]
    eval_main([str(sweep / "0")])
    assert f"acc {read_summary(sweep / '0')['best']['acc']:.4f}" in capsys.readouterr().out
    assert compare_main([str(sweep), "--out", str(tmp_path / "cmp"), "--no-plots"]) == 0
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert (
        "training loss is" in table and "| trainer.lr=0.1, backbone=tiny_t5 |" in table
    )  # failed ones listed too
    assert read_summary(sweep / "0")["pack_size"] == 2  # trained beside job 2, which failed
    assert "its pack's, shared with the other runs in it (runs per pack)" in table
    cost_rows = [line for line in table.splitlines() if line.startswith("| trainer.lr=0.1, backbone=") and "sst2 |" in line]
    assert sorted(row.split("|")[-2].strip() for row in cost_rows) == ["2.0", "2.0"]


@pytest.mark.parametrize(
    "setting, message",
    [
        ("hydra.launcher.pack_size=0", "hydra.launcher.pack_size=0: give a whole number of runs per pack"),
        ("hydra.launcher.packs=2", "Key 'packs' not in 'PackedLauncherConf'"),
        ("hardware=multi_gpu", "hydra/launcher=packed trains each pack in one process"),
    ],
)
def test_a_bad_launcher_setting_is_one_line_before_any_model_loads(tmp_path, setting, message):
    result = packed_sweep(tmp_path / "sweep", "backbone=tiny_t5", "seed=0,1", setting)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("ptlab: error:") and message in lines[-1], result.stderr[-2000:]
    assert "trainable parameters" not in result.stdout  # no run was built


def test_a_killed_pack_resumes_and_each_member_ends_as_if_never_killed(tmp_path):
    """kill -9 at a random step; the same command again: the members that had finished are
    skipped, the others resume from their last checkpoints and end equal to their runs alone."""
    sweep = tmp_path / "sweep"
    args = [*COMMON, "backbone=tiny_t5", "trainer.eval_every=5", "seed=0,1", "trainer.max_steps=5,30"]
    process = subprocess.Popen(
        [sys.executable, "-m", "ptlab.cli.train", "-m", "hydra/launcher=packed", f"hydra.sweep.dir={sweep}", *args],
        cwd=REPO, env={**os.environ, **OFFLINE_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    kill_after = random.randint(11, 18)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        metrics = sweep / "1" / "metrics.jsonl"
        if metrics.exists() and any(
            json.loads(line)["step"] >= kill_after for line in metrics.read_text().splitlines()[:-1]
        ):
            break
        time.sleep(0.05)
    process.kill()  # SIGKILL: no handler runs
    process.wait()
    assert last(sweep / "1")["train_state"]["step"] in (10, 15)  # its last checkpoint, mid-run
    assert read_summary(sweep / "0")["status"] == "finished"  # the 5-step members were done
    again = cli(["-m", "hydra/launcher=packed", f"hydra.sweep.dir={sweep}", *args], timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already finished") == 2
    for job, seed in ((1, 0), (3, 1)):
        alone = tmp_path / f"alone{job}"
        run(compose_config([*COMMON, "backbone=tiny_t5", "trainer.eval_every=5", f"seed={seed}",
                            "trainer.max_steps=30"]), run_dir=alone)  # fmt: skip
        assert_same_run(sweep / str(job), alone)


def test_an_optuna_batch_of_n_jobs_trials_is_one_pack(tmp_path):
    sweep = tmp_path / "sweep"
    result = packed_sweep(
        sweep, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
        "trainer.lr=interval(0.01,0.3)", "backbone=tiny_t5", "trainer.max_steps=2", "trainer.eval_every=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pack 1: jobs 0,1 (2 runs)" in result.stdout and "pack 1: jobs 2,3 (2 runs)" in result.stdout
    assert result.stdout.count("pack of 2 runs on tiny_t5: training together") == 2
    assert all(read_summary(sweep / str(job))["status"] == "finished" for job in range(4))

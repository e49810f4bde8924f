"""The training loop: it learns, it is deterministic, it resumes exactly, its checkpoints are atomic."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_scale_out import QUICK, cli

from ptlab.config.schema import LoggerConfig
from ptlab.errors import ConfigError
from ptlab.model.compile import compile_blocks
from ptlab.training import checkpoint, loop
from ptlab.training.job import run
from ptlab.training.tracking import Tracker

from conftest import TINY, compose_config

STEPS = ["trainer.max_steps=6", "trainer.eval_every=2", "trainer.log_every=1", "trainer.batch_size=8"]


def events(run_dir, split):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("examples_per_s", "wall_s", "train_s")}
        for line in lines
        if json.loads(line)["split"] == split
    ]


def train(tmp_path, name, overrides):
    run_dir = tmp_path / name
    score = run(compose_config(TINY + overrides), run_dir=run_dir)
    return score, run_dir, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("backbone", ["tiny_t5", "tiny_llama", "tiny_bert"])
def test_training_lowers_the_loss(tmp_path, backbone, recwarn):
    _, run_dir, summary = train(
        tmp_path,
        backbone,
        [
            f"backbone={backbone}",
            "trainer.max_steps=40",
            "trainer.eval_every=40",
            "trainer.log_every=10",
            "trainer.optimizer=adamw",
            "trainer.lr=0.05",
            "backbone.dropout=false",
        ],
    )
    losses = [event["loss"] for event in events(run_dir, "train")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert summary["steps"] == 40 and summary["trainable_params"] > 0
    # the stack's optimizer step is the run's own: its lr schedule steps without torch's warning
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_same_seed_same_metrics_different_seed_different_prompt(tmp_path):
    _, a, _ = train(tmp_path, "a", ["backbone=tiny_t5", *STEPS])
    _, b, _ = train(tmp_path, "b", ["backbone=tiny_t5", *STEPS])
    _, c, _ = train(tmp_path, "c", ["backbone=tiny_t5", *STEPS, "seed=1"])
    assert events(a, "train") == events(b, "train") and events(a, "validation") == events(b, "validation")
    prompts = [
        load_file(d / "checkpoints/last/../best/prompt.safetensors")["method.prompt_embeds"]
        for d in (a, b, c)
    ]
    assert torch.equal(prompts[0], prompts[1]) and not torch.equal(prompts[0], prompts[2])


class Killed(Exception):
    pass


@pytest.mark.parametrize("backbone", ["tiny_t5", "tiny_bert"])
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path, monkeypatch, backbone):
    # dropout on, so the restored RNG streams matter too
    overrides = [f"backbone={backbone}", "backbone.dropout=true", *STEPS]
    _, full, full_summary = train(tmp_path, "full", overrides)

    original_step = loop.step

    def dies_at_step_5(runs):
        if runs[0][0].state.step == 4:
            raise Killed()
        return original_step(runs)

    monkeypatch.setattr(loop, "step", dies_at_step_5)
    with pytest.raises(Killed):
        train(tmp_path, "resumed", overrides)
    steps_run = []

    def counted(runs):
        steps_run.append(runs[0][0].state.step)
        return original_step(runs)

    monkeypatch.setattr(loop, "step", counted)
    _, resumed, resumed_summary = train(tmp_path, "resumed", [*overrides, "trainer.resume=true"])
    assert steps_run == [4, 5]  # continued after the checkpoint at step 4

    for key in ("best", "final", "steps"):
        assert resumed_summary[key] == full_summary[key]
    assert events(resumed, "train") == events(full, "train")
    assert events(resumed, "validation") == events(full, "validation")
    full_state = checkpoint.load_training_state(full / "checkpoints/last")
    resumed_state = checkpoint.load_training_state(resumed / "checkpoints/last")
    for name, tensor in full_state["trainable"].items():
        assert torch.equal(tensor, resumed_state["trainable"][name])


def test_resume_refuses_a_checkpoint_of_another_method_config(tmp_path):
    _, run_dir, _ = train(tmp_path, "a", ["backbone=tiny_t5", *STEPS])
    with pytest.raises(Exception, match="trainer.resume"):
        run(
            compose_config(
                TINY + ["backbone=tiny_t5", *STEPS, "method.prompt_length=3", "trainer.resume=true"]
            ),
            run_dir=run_dir,
        )


def test_kill_during_checkpoint_save_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = checkpoint.save_training_state

    def crash_on_second_save(folder, state):
        calls["n"] += 1
        if calls["n"] == 2:
            (folder / "state.pt").write_bytes(b"half-written")
            raise Killed()
        original(folder, state)

    monkeypatch.setattr(checkpoint, "save_training_state", crash_on_second_save)
    with pytest.raises(Killed):
        train(tmp_path, "crash", ["backbone=tiny_t5", *STEPS])
    last = checkpoint.find(tmp_path / "crash/checkpoints/last")
    assert last is not None and checkpoint.load_training_state(last)["train_state"]["step"] == 2


def test_interrupted_folder_swap_falls_back_to_the_previous_checkpoint(tmp_path):
    target = tmp_path / "checkpoints/last"
    checkpoint.write_atomic_dir(target, lambda folder: checkpoint.save_training_state(folder, {"step": 1}))
    target.rename(target.with_name("last.old"))  # killed between the two renames
    assert checkpoint.load_training_state(checkpoint.find(target)) == {"step": 1}
    checkpoint.write_atomic_dir(target, lambda folder: checkpoint.save_training_state(folder, {"step": 2}))
    assert checkpoint.load_training_state(checkpoint.find(target)) == {"step": 2}
    assert not target.with_name("last.old").exists()


def test_saved_prompt_loads_without_ptlab(tmp_path):
    _, run_dir, summary = train(tmp_path, "a", ["backbone=tiny_t5", *STEPS, "method.prompt_length=7"])
    best = run_dir / "checkpoints/best"
    tensors = load_file(best / "prompt.safetensors")
    config = json.loads((best / "prompt_config.json").read_text())
    assert tensors["method.prompt_embeds"].shape == (7, config["hidden_size"])
    assert config["method"]["name"] == "prompt_tuning" and config["task"] == "sst2"
    assert summary["trainable_params"] == 7 * config["hidden_size"]


def test_early_stopping_stops_after_patience(tmp_path):
    _, _, summary = train(
        tmp_path,
        "a",
        [
            "backbone=tiny_t5",
            "trainer.max_steps=200",
            "trainer.eval_every=1",
            "trainer.patience=2",
            "trainer.lr=1e-9",
        ],
    )
    assert summary["stopped_early"] and summary["steps"] < 200


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    common = [
        "backbone=tiny_t5",
        "backbone.dropout=false",
        "trainer.optimizer=adamw",
        "trainer.max_steps=1",
        "trainer.eval_every=1",
    ]
    train(
        tmp_path, "big", [*common, "trainer.batch_size=8", "trainer.grad_accum=1", "trainer.grad_clip=null"]
    )
    train(
        tmp_path, "accum", [*common, "trainer.batch_size=4", "trainer.grad_accum=2", "trainer.grad_clip=null"]
    )
    big, accum = (
        load_file(tmp_path / name / "checkpoints/best/prompt.safetensors")["method.prompt_embeds"]
        for name in ("big", "accum")
    )
    assert torch.allclose(big, accum, atol=1e-6)


def test_warmup_then_linear_decay(tmp_path):
    _, run_dir, _ = train(
        tmp_path,
        "a",
        [
            "backbone=tiny_t5",
            "trainer.max_steps=4",
            "trainer.eval_every=4",
            "trainer.log_every=1",
            "trainer.lr=0.2",
            "trainer.lr_schedule=linear",
            "trainer.warmup_ratio=0.5",
        ],
    )
    assert [event["lr"] for event in events(run_dir, "train")] == pytest.approx([0.1, 0.2, 0.1, 0.0])


def test_gpu_hardware_without_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(Exception, match="hardware=gpu needs CUDA, and no CUDA device is visible"):
        train(tmp_path, "a", ["backbone=tiny_t5", "hardware=gpu"])


def test_starting_over_in_a_used_folder_keeps_only_the_new_events(tmp_path):
    train(tmp_path, "a", ["backbone=tiny_t5", *STEPS])
    first = events(tmp_path / "a", "train")
    train(tmp_path, "a", ["backbone=tiny_t5", *STEPS, "trainer.resume=false"])
    assert events(tmp_path / "a", "train") == first  # replaced, not appended


def test_resume_auto_of_a_finished_run_trains_no_more(tmp_path, monkeypatch):
    _, run_dir, summary = train(tmp_path, "a", ["backbone=tiny_t5", *STEPS])
    monkeypatch.setattr(loop, "step", lambda runs: pytest.fail("trained again"))
    _, _, again = train(tmp_path, "a", ["backbone=tiny_t5", *STEPS])
    assert again["best"] == summary["best"] and again["steps"] == summary["steps"]


def test_compiled_blocks_train_the_same_prompt_as_eager(tmp_path, caplog):
    common = ["backbone=tiny_llama", "backbone.dropout=false", "trainer.max_steps=2", "trainer.eval_every=2"]
    train(tmp_path, "eager", common)
    with caplog.at_level("INFO", logger="ptlab"):
        train(tmp_path, "compiled", [*common, "trainer.compile=true"])
    assert "trainer.compile: compiled 2 transformer blocks" in caplog.text
    eager, compiled = (
        load_file(tmp_path / name / "checkpoints/best/prompt.safetensors")["method.prompt_embeds"]
        for name in ("eager", "compiled")
    )
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_compile_refuses_a_model_whose_blocks_it_does_not_know():
    model = torch.nn.Module()
    model.config = type("Config", (), {"model_type": "gpt_neox"})()
    with pytest.raises(ConfigError, match="model_type='gpt_neox'.*trainer.compile=true"):
        compile_blocks(model)


def test_without_a_terminal_progress_comes_as_lines_in_stdout_and_train_log(tmp_path):
    steps = [
        "trainer.max_steps=4",
        "trainer.log_every=2",
        "trainer.eval_every=2",
        f"hydra.run.dir={tmp_path}",
    ]
    result = cli([*QUICK, *steps], timeout=300)  # stdout is a pipe, as under SLURM or nohup
    assert result.returncode == 0, result.stderr[-2000:]
    for text in (result.stdout, (tmp_path / "train.log").read_text()):
        lines = [line for line in text.splitlines() if "ptlab.training.progress" in line]
        assert [line.split(" - ")[1].split()[1] for line in lines] == ["2/4", "2", "4/4", "4"]
        assert "loss" in lines[0] and "examples/s" in lines[0] and "ETA" in lines[0]
        assert "validation: acc" in lines[1] and "(best acc" in lines[1] and "majority class 0.5" in lines[1]


def test_a_regression_task_reports_the_mean_predictor_as_its_floor(tmp_path):
    steps = ["task=stsb", "trainer.max_steps=2", "trainer.eval_every=2", f"hydra.run.dir={tmp_path}"]
    result = cli([*QUICK, *steps], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    floor = json.loads((tmp_path / "summary.json").read_text())["baseline"]
    assert floor["name"] == "mean predictor" and floor["pearson"] == 0.0 and floor["spearman"] == 0.0
    assert "mean predictor 0.0000)" in result.stdout  # the evaluation line
    assert "(step 2; mean predictor: 0.0000); summary:" in result.stdout  # the final result


def test_resume_truncation_keeps_the_earlier_events_and_swaps_the_file_in_whole(tmp_path):
    tracker = Tracker(tmp_path, LoggerConfig(name="none"))
    for step in (1, 2, 3, 4):
        tracker.log(step, "train", {"loss": 1.0 / step})
    with open(tracker.metrics_file, "a") as handle:
        handle.write('{"step": 5, "spl')  # killed mid-write
    before = tracker.metrics_file.stat().st_ino
    tracker.truncate_after(2)
    events = [json.loads(line) for line in tracker.metrics_file.read_text().splitlines()]
    assert [(event["step"], event["loss"]) for event in events] == [(1, 1.0), (2, 0.5)]
    # written aside and renamed in (ptlab.files): a new file took the name, no temporary one is left
    assert tracker.metrics_file.stat().st_ino != before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics.jsonl"]

"""Beyond one process: torchrun DDP on CPU (gloo), preemption and requeue, submitit and Optuna sweeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from ptlab.config.compose import compose
from ptlab.config.schema import to_object
from ptlab.training import checkpoint

from conftest import OFFLINE_ENV, REPO, TINY, compose_config

QUICK = [
    *TINY,
    "backbone=tiny_t5",
    "backbone.dropout=false",
    "hardware.num_threads=1",
    "trainer.optimizer=adamw",
]


def cli(args, cwd=REPO, launcher=("-m", "ptlab.cli.train"), env_extra=None, **kwargs):
    env = {**os.environ, **OFFLINE_ENV, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, *launcher, *args], cwd=cwd, env=env, capture_output=True, text=True, **kwargs
    )


def trained_prompt(run_dir):
    return checkpoint.load_training_state(run_dir / "checkpoints/last")["trainable"]["method.prompt_embeds"]


def test_ddp_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path):
    steps = [*QUICK, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.batch_size=8"]
    single = cli([*steps, "logger=none", f"hydra.run.dir={tmp_path / 'single'}"], timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ptlab.cli.train")
    ddp = cli(
        [*steps, "logger=wandb", "hardware.distributed=true"],
        cwd=tmp_path,
        launcher=launcher,
        env_extra={"WANDB_MODE": "offline"},
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    folders = list((tmp_path / "outputs/runs/ddp").iterdir())
    assert len(folders) == 1  # both ranks wrote into one run folder
    run_dir = folders[0]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # only rank 0 talks to W&B
    assert (run_dir / ".hydra").is_dir() and (run_dir / "train_rank1.log").exists()
    assert torch.allclose(trained_prompt(run_dir), trained_prompt(tmp_path / "single"), atol=1e-6)
    ddp_summary = json.loads((run_dir / "summary.json").read_text())
    # the validation loss sums each rank's shard of examples: equal to rounding
    assert ddp_summary["best"] == pytest.approx(json.loads((tmp_path / "single/summary.json").read_text())["best"], rel=1e-6)


def test_single_process_config_refuses_a_multi_process_launch(tmp_path):
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ptlab.cli.train")
    result = cli([*QUICK, "logger=none"], cwd=tmp_path, launcher=launcher, timeout=300)
    assert result.returncode != 0 and "use hardware=multi_gpu" in result.stderr


def test_sigterm_checkpoints_and_the_rerun_ends_like_an_uninterrupted_run(tmp_path):
    steps = [
        *QUICK,
        "logger=none",
        "trainer.max_steps=120",
        "trainer.eval_every=50",
        "trainer.log_every=1",
        "trainer.batch_size=4",
        "backbone.dropout=true",
    ]
    full = cli([*steps, f"hydra.run.dir={tmp_path / 'full'}"], timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]

    run_dir = tmp_path / "preempted"
    env = {**os.environ, **OFFLINE_ENV}
    command = [sys.executable, "-m", "ptlab.cli.train", *steps, f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        lines = (
            (run_dir / "metrics.jsonl").read_text().splitlines()
            if (run_dir / "metrics.jsonl").exists()
            else []
        )
        if len(lines) >= 20:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "SIGTERM at step" in stderr
    stopped_at = checkpoint.load_training_state(run_dir / "checkpoints/last")["train_state"]["step"]
    assert 20 <= stopped_at < 120

    rerun = cli([*steps, f"hydra.run.dir={run_dir}"], timeout=300)  # trainer.resume=auto picks it up
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resumed from {run_dir / 'checkpoints/last'} at step {stopped_at}" in rerun.stdout
    summaries = [json.loads((d / "summary.json").read_text()) for d in (tmp_path / "full", run_dir)]
    for key in ("best", "final", "steps"):
        assert summaries[0][key] == summaries[1][key]
    assert torch.equal(trained_prompt(run_dir), trained_prompt(tmp_path / "full"))


def test_submitit_local_multirun_runs_both_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    result = cli(
        [
            "-m",
            *QUICK,
            "logger=wandb",
            "trainer.max_steps=2",
            "trainer.eval_every=2",
            "seed=1,2",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10",
            f"hydra.sweep.dir={sweep}",
        ],
        env_extra={"WANDB_MODE": "offline"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((sweep / str(job) / "summary.json").read_text()) for job in (0, 1)]
    assert sorted(s["seed"] for s in summaries) == [1, 2]
    assert summaries[0]["wandb"]["group"] == summaries[1]["wandb"]["group"]
    assert summaries[0]["wandb"]["id"] != summaries[1]["wandb"]["id"]


def test_optuna_sweep_optimises_the_returned_validation_metric(tmp_path):
    sweep = tmp_path / "optuna"
    result = cli(
        [
            "-m",
            *QUICK,
            "logger=none",
            "trainer.max_steps=3",
            "trainer.eval_every=3",
            "hydra/sweeper=optuna",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.direction=maximize",
            "hydra.sweeper.sampler.seed=0",
            "trainer.lr=interval(0.001,0.1)",
            f"hydra.sweep.dir={sweep}",
        ],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = [json.loads((sweep / str(i) / "summary.json").read_text())["best"]["acc"] for i in range(3)]
    assert best["best_value"] == pytest.approx(max(trials))
    assert 0.001 <= best["best_params"]["trainer.lr"] <= 0.1


@pytest.mark.parametrize(
    "experiment,jobs",
    [("smop_superglue", 6 * 2 * 3), ("superpos_glue", 2 * 3 * 2 * 13 * 3), ("fpt_t5large", 4 * 2 * 3)],
)
def test_experiment_configs_compose_and_every_swept_value_is_valid(experiment, jobs):
    cfg = compose([f"experiment={experiment}"], with_hydra=True)
    params = cfg.hydra.sweeper.params
    count = 1
    for key, values in params.items():
        options = str(values).split(",")
        count *= len(options)
        for option in options:  # each swept value composes and validates with the experiment
            to_object(compose_config([f"experiment={experiment}", f"{key}={option}"]))
    assert count == jobs
    config = to_object(compose_config([f"experiment={experiment}"]))
    assert config.logger.group == experiment and config.hardware.device == "cuda"
    assert config.trainer.optimizer == "adafactor"


@pytest.mark.parametrize(
    "recipe,expected",
    [
        ("lester2021", dict(optimizer="adafactor", lr=0.3, weight_decay=1e-5, lr_schedule="constant")),
        (
            "smop2023",
            dict(optimizer="adafactor", lr=0.5, weight_decay=1e-5, lr_schedule="linear", warmup_ratio=0.06),
        ),
        ("fpt2022", dict(optimizer="adafactor", lr=0.3, lr_schedule="constant", grad_clip=1.0)),
    ],
)
def test_the_papers_optimizer_recipes_are_choices_the_command_line_overrides(recipe, expected):
    trainer = to_object(compose_config([f"optim={recipe}"])).trainer
    assert {key: getattr(trainer, key) for key in expected} == expected
    assert to_object(compose_config([f"optim={recipe}", "trainer.lr=0.1"])).trainer.lr == 0.1
    assert to_object(compose_config([])).trainer.optimizer == "adamw"  # no recipe: the schema's defaults


def test_experiments_take_their_papers_optimizer_recipe():
    smop = to_object(compose_config(["experiment=smop_superglue"])).trainer
    assert (smop.lr, smop.warmup_ratio, smop.lr_schedule, smop.batch_size) == (0.5, 0.06, "linear", 32)
    fpt = to_object(compose_config(["experiment=fpt_t5large", "recipe=fpt"]))  # as its sweep sets it
    assert (fpt.trainer.lr, fpt.trainer.grad_clip, fpt.method.run_label, fpt.stages.name) == (
        0.3,
        1.0,
        "fpt",
        "fpt",
    )


@pytest.mark.parametrize(
    "experiment,jobs", [("smollm2_methods", 3 * 2 * 9), ("minilm_methods", 3 * 2 * 5), ("minilm_fpt", 3 * 4)]
)
def test_comparison_experiments_compose_every_recipe(experiment, jobs):
    """The CPU comparisons (scripts/compare.py presets): every swept value composes and validates,
    seeds vary slowest (a finished prefix holds every arm), and each arm is what it says."""
    params = compose([f"experiment={experiment}"], with_hydra=True).hydra.sweeper.params
    assert list(params)[0] == "seed"
    count = 1
    for key, values in params.items():
        options = str(values).split(",")
        count *= len(options)
        for option in options:
            config = to_object(compose_config([f"experiment={experiment}", f"{key}={option}"]))
            assert config.hardware.device == "cpu" and config.logger.group == experiment
            if key == "recipe":
                assert config.backbone.dropout == (option == "superpos_dropout_on")
                assert config.method.run_label == {"pt20": "pt20", "fpt_cr": "fpt_cr"}.get(option, option)
                assert (config.stages.name == "fpt") == (option == "fpt_cr")
    assert count == jobs


def test_ddp_inside_a_submitit_job_with_two_tasks(tmp_path):
    sweep = tmp_path / "sweep"
    result = cli(
        [
            "-m",
            *QUICK,
            "logger=wandb",
            "hardware.distributed=true",
            "trainer.max_steps=2",
            "trainer.eval_every=2",
            "hydra/launcher=submitit_local",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.timeout_min=10",
            f"hydra.sweep.dir={sweep}",
        ],
        env_extra={"WANDB_MODE": "offline"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    job = sweep / "0"
    assert json.loads((job / "summary.json").read_text())["steps"] == 2
    assert (job / "train_rank1.log").exists()  # the second task ran as rank 1 of the same run
    assert len(list((job / "wandb").glob("offline-run-*"))) == 1


FAST = [*QUICK, "logger=none", "trainer.max_steps=2", "trainer.eval_every=2"]


def job_statuses(sweep):
    return {path.parent.name: json.loads(path.read_text()) for path in sweep.glob("*/summary.json")}


def test_a_failing_job_does_not_take_a_multirun_down(tmp_path):
    sweep = tmp_path / "sweep"
    result = cli(["-m", *FAST, "method.prompt_length=0,5", f"hydra.sweep.dir={sweep}"], timeout=600)
    assert result.returncode == 1
    assert (
        "ptlab: error: 1 of 2 jobs failed: job 0" in result.stderr
        and "prompt_length=0 must be >= 1" in result.stderr
    )
    jobs = job_statuses(sweep)
    assert jobs["0"] == {
        "status": "failed",
        "error": "method.prompt_length=0 must be >= 1",
        "kind": "ConfigError",
    }
    assert jobs["1"]["status"] == "finished" and jobs["1"]["steps"] == 2


def test_a_failing_optuna_trial_is_recorded_as_failed_and_the_study_goes_on(tmp_path):
    sweep = tmp_path / "optuna"
    optuna = ["hydra/sweeper=optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.direction=maximize"]
    args = ["-m", *FAST, *optuna, "hydra.sweeper.sampler.seed=0", "method.prompt_length=choice(0,5)"]
    result = cli([*args, f"hydra.sweep.dir={sweep}"], timeout=600)
    assert result.returncode == 1 and "jobs failed" in result.stderr
    statuses = [job["status"] for job in job_statuses(sweep).values()]
    assert len(statuses) == 4 and "failed" in statuses and "finished" in statuses
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"]["method.prompt_length"] == 5

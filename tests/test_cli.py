"""The command line as researchers use it: multirun sweeps with W&B offline, logger failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from test_scale_out import cli

from ptlab.training import tracking
from ptlab.training.job import run

from conftest import OFFLINE_ENV, REPO, TINY, compose_config

QUICK = [*TINY, "backbone=tiny_t5", "trainer.max_steps=2", "trainer.eval_every=2"]


def test_multirun_makes_one_folder_and_one_distinct_offline_wandb_run_per_job(tmp_path):
    """Each job: its own folder and W&B run, a name led by the swept keys (unique in the sweep), the
    sweep's group, the dashboard's keys at the top of the config, the prompt as an artifact."""
    env = {**__import__("os").environ, **OFFLINE_ENV, "WANDB_MODE": "offline"}
    sweep = tmp_path / "sweep_rte_cb"
    overrides = [o for o in QUICK if not o.startswith("logger=")]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ptlab.cli.train",
            "-m",
            *overrides,
            "logger=wandb",
            "logger.log_prompt=true",
            "seed=1,2",
            "method=prompt_tuning,smop",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((sweep / str(job) / "summary.json").read_text()) for job in range(4)]
    assert [(s["seed"], s["method"]) for s in summaries] == [
        (1, "prompt_tuning"), (1, "smop"), (2, "prompt_tuning"), (2, "smop")
    ]  # fmt: skip
    runs = [s["wandb"] for s in summaries]
    assert len({r["id"] for r in runs}) == 4  # no job reuses the previous job's run
    assert len({r["name"] for r in runs}) == 4  # and no two share a name
    assert runs[1]["name"].startswith("method=smop,seed=1,data.")  # the swept keys first, then the rest
    assert "backbone=tiny_t5" in runs[1]["name"]
    assert {r["group"] for r in runs} == {f"{tmp_path.name}_sweep_rte_cb"}
    assert all(r["mode"] == "offline" for r in runs)
    for job, (info, summary) in enumerate(zip(runs, summaries)):
        files = list((sweep / str(job) / "wandb").glob(f"offline-run-*-{info['id']}/run-{info['id']}.wandb"))
        assert len(files) == 1
        logged = files[0].read_bytes()
        assert info["group"].encode() in logged
        label = json.dumps(summary["method"]).encode()  # the config item `method`, as W&B's record holds it
        assert b"\x06method\x82\x01" + bytes([len(label)]) + label in logged and b"method_config" in logged
        assert f"prompt-{summary['method']}-sst2-{info['id']}".encode() in logged  # the prompt artifact


def test_wandb_failure_is_a_warning_not_a_crash(tmp_path, monkeypatch, caplog):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(wandb, "init", broken_init)
    score = run(compose_config([*QUICK, "logger=wandb"]), run_dir=tmp_path)
    assert 0.0 <= score <= 1.0
    assert "W&B disabled for this run: W&B is down" in caplog.text
    assert json.loads((tmp_path / "summary.json").read_text())["wandb"] is None


def test_logger_none_writes_local_files_only(tmp_path):
    run(compose_config(QUICK), run_dir=tmp_path)
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "summary.json").exists()
    assert not (tmp_path / "wandb").exists()


@pytest.mark.parametrize(
    "overrides,swept,expected",
    [
        (["method.prompt_length=5", "seed=3", "task=rte"], [], "method.prompt_length=5,seed=3,task=rte"),
        (["hydra.run.dir=x", "logger=wandb"], [], None),
        (
            ["method.prompt_length=5", "seed=3", "task=rte"],
            ["seed", "task"],
            "task=rte,seed=3,method.prompt_length=5",
        ),
        (
            [f"data.max_train_examples={i}" for i in range(9)] + ["task=cb", "seed=0"],
            ["seed", "task"],
            "task=cb,seed=0," + ",".join(f"data.max_train_examples={i}" for i in range(4)),
        ),
    ],
)
def test_run_names_lead_with_the_swept_keys_and_never_cut_an_item(overrides, swept, expected):
    """The swept keys first (seed last among them), then the rest in command-line order; an item
    that does not fit in 128 characters is left out whole."""
    assert tracking.run_name(overrides, swept) == expected


def test_wandb_mode_is_offline_without_an_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tracking.wandb_mode(compose_config(["logger=wandb"]).logger) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.wandb_mode(compose_config(["logger=wandb"]).logger) == "online"


WANDB_QUICK = [*QUICK, "logger=wandb", "trainer.eval_every=2"]


def test_a_run_folder_owns_one_wandb_run_that_every_later_process_continues(tmp_path):
    run_dir = tmp_path / "run"
    for steps in (2, 4):  # a first process, then the same folder extended to more steps
        result = cli(
            [*WANDB_QUICK, f"trainer.max_steps={steps}", f"hydra.run.dir={run_dir}"],
            env_extra={"WANDB_MODE": "offline"},
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert "wandb:" not in result.stdout + result.stderr  # logger.quiet: W&B's own lines off
    run_id = (run_dir / "wandb_id").read_text()
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(path.name.endswith(f"-{run_id}") for path in offline_runs)
    assert json.loads((run_dir / "summary.json").read_text())["wandb"]["id"] == run_id


def test_an_unreachable_wandb_server_costs_seconds_then_the_run_logs_offline(tmp_path):
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "a" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    started = time.perf_counter()
    result = cli(
        [*WANDB_QUICK, "trainer.max_steps=2", "logger.init_timeout=3", f"hydra.run.dir={tmp_path}"],
        env_extra=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.perf_counter() - started < 60
    assert "W&B could not start online" in result.stdout + result.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["wandb"]["mode"] == "offline"


def test_help_is_ptlabs_own_and_lists_every_user_facing_value_and_no_schema():
    result = cli(["--help"], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert text.startswith("ptlab-train: soft-prompt tuning") and "powered by Hydra" not in text
    for group in (
        "backbone",
        "experiment",
        "hardware",
        "logger",
        "method",
        "optim",
        "recipe",
        "stages",
        "task",
    ):
        (line,) = [line for line in text.splitlines() if line.startswith(f"{group}: ")]
        listed = set(line.split(": ", 1)[1].split(", "))
        assert listed == {path.stem for path in (REPO / "conf" / group).glob("*.yaml")}, group
    assert "schema" not in text
    assert 'eval "$(ptlab-train -sc install=bash)"' in text and "docs/tasks.md" in text


def test_a_schema_is_not_a_value_of_its_group():
    result = cli(["method=schema_method_residual", "--cfg", "job"], timeout=120)
    assert result.returncode == 2 and "Could not find 'method/schema_method_residual'" in result.stderr


def test_help_and_cfg_load_neither_transformers_nor_the_data_stack():
    probe = (
        "import sys\nfrom ptlab.cli.train import main\n"
        "for argv in (['--help'], ['--cfg', 'job', 'method=smop', 'task=cb']):\n"
        "    sys.argv = ['ptlab-train', *argv]\n"
        "    try:\n        main()\n    except SystemExit as stop:\n        assert not stop.code, stop.code\n"
        "print(sorted(m for m in ('transformers', 'datasets', 'wandb', 'scipy', 'pandas') if m in sys.modules))"
    )
    env = {**__import__("os").environ, **OFFLINE_ENV}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "[]"


def test_the_fast_help_is_the_text_hydra_prints():
    env = {**__import__("os").environ, **OFFLINE_ENV}
    fast = subprocess.run(
        [sys.executable, "-m", "ptlab.cli.entry", "--help"], capture_output=True, text=True, env=env
    )
    hydra = cli(["--help"], timeout=120)
    assert fast.returncode == 0 and hydra.returncode == 0
    assert fast.stdout == hydra.stdout and "task: " in fast.stdout
    assert "torch" not in subprocess.run(
        [sys.executable, "-c", "import sys\nsys.argv = ['ptlab-train', '-h']\nfrom ptlab.cli.entry import main\nmain()\n"
         "print(sorted(m for m in ('torch', 'hydra._internal.hydra') if m in sys.modules))"],
        capture_output=True, text=True, env=env,
    ).stdout.splitlines()[-1]  # fmt: skip


def test_help_into_a_pipe_its_reader_has_closed_ends_without_a_traceback():
    """`ptlab-train --help | head -2`: head has gone before the text is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    done = subprocess.run([sys.executable, "-m", "ptlab.cli.entry", "--help"], stdout=write_end,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, **OFFLINE_ENV})  # fmt: skip
    os.close(write_end)
    assert done.returncode == 1 and done.stderr == "", done.stderr

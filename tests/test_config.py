"""Every config group value composes and validates; bad values fail early with a clear message."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from ptlab.config.schema import Config, to_object
from ptlab.errors import ConfigError

from conftest import METHOD_ALIASES, OFFLINE_ENV, REPO, compose_config, group_values


@pytest.mark.parametrize(
    "group,value",
    [
        (group, value)
        for group in ("method", "backbone", "task", "hardware", "logger", "stages")
        for value in group_values(group)
    ],
)
def test_every_group_value_composes_and_validates(group, value):
    config = to_object(compose_config([f"{group}={value}"]))
    assert isinstance(config, Config)
    expected = METHOD_ALIASES.get(value, value) if group == "method" else value
    assert getattr(config, group).name == expected


def test_groups_hold_what_the_runner_promises():
    assert {
        "t5_small",
        "t5_base",
        "t5_large",
        "t5_lm_adapt_small",
        "t5_lm_adapt_base",
        "t5_lm_adapt_large",
        "t5_lm_adapt_xl",
        "minilm_l6",
        "smollm2_135m",
        "tiny_t5",
        "tiny_llama",
        "tiny_bert",
    } <= set(group_values("backbone"))
    assert {
        "boolq",
        "cb",
        "copa",
        "multirc",
        "rte",
        "wic",
        "sst2",
        "mrpc",
        "rte_glue",
        "cola",
        "stsb",
        "qnli",
        "mnli",
        "qqp",
    } <= set(group_values("task"))


def test_misspelled_key_is_rejected_at_composition():
    with pytest.raises(Exception, match="lrr"):
        compose_config(["trainer.lrr=0.1"])


def test_wrong_type_is_rejected_at_composition():
    with pytest.raises(Exception, match="batch_size"):
        compose_config(["trainer.batch_size=many"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("method.prompt_length=0", "method.prompt_length=0 must be >= 1"),
        ("trainer.optimizer=sgd", "trainer.optimizer='sgd'"),
        ("data.split_protocol=random", "data.split_protocol='random'"),
        ("trainer.max_steps=0", "trainer.max_steps=0"),
        ("method.init=text", "method.init=text needs method.init_text"),
        ("seed=-1", "seed=-1 must be an integer in [0, 2**32 - 1]"),
        ("seed=4294967296", "seed=4294967296 must be an integer in [0, 2**32 - 1]"),
    ],
)
def test_bad_values_raise_config_error_naming_them(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        to_object(compose_config([override]))


def run_cli(*args, env_extra=None, cwd=None):
    env = {**__import__("os").environ, **OFFLINE_ENV, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "ptlab.cli.train", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or REPO,
        timeout=600,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["method=nope"], "Could not find 'method/nope'"),
        (["task=nope"], "Could not find 'task/nope'"),
        (["backbone=nope"], "Could not find 'backbone/nope'"),
        (["trainer.lrr=0.1"], "Key 'lrr' not in 'TrainerConfig' (did you mean trainer.lr? it has: batch_size, "),
        (["method=superpos", "method.sample=3"], "Key 'sample' not in 'SuperPosConfig' (did you mean method.sample_seed? "
                                                 "it has: init_from, label, name, num_vocab_samples, "),
        (["trainer.lr=abc"], "trainer.lr=abc"),
        (["method=nope"], "available in 'method': deep_prompt prompt_tuning"),
        (["method.prompt_length=0"], "ptlab: error: method.prompt_length=0 must be >= 1"),
        (["seed=-1"], "ptlab: error: seed=-1 must be an integer in [0, 2**32 - 1]"),
        (["backbone=tiny_bert", "data.max_source_length=1020"], "exceeds the backbone's 1024 positions"),
        (["schedule=fpt"], "ptlab: error: 'schedule=fpt': the group 'schedule' is now 'stages' (FPT's stages "
                           "of partial models; the lr schedule is trainer.lr_schedule): write 'stages=fpt'"),
        (["-m", "schedule.score_examples=8,16"], "write 'stages.score_examples=8,16'"),
    ],
)
def test_cli_bad_input_exits_nonzero_with_one_clear_message(args, message, tmp_path):
    result = run_cli(*args, "logger=none", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()  # Hydra's errors and ptlab's read alike
    assert line.startswith("ptlab: error:") and message in line
    assert line.count(" is now ") <= 1  # a renamed group's pointer is said once
    assert "Traceback" not in result.stderr


def test_cli_missing_data_file_names_the_files_to_place(tmp_path):
    result = run_cli(
        "backbone=tiny_t5",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
        env_extra={"PTLAB_DATA_DIR": str(tmp_path)},
    )
    assert result.returncode == 2
    assert "glue/sst2/train.tsv" in result.stderr and "PTLAB_DATA_DIR" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_prints_composed_config():
    result = run_cli("--cfg", "job", "method.prompt_length=7")
    assert result.returncode == 0, result.stderr
    assert "prompt_length: 7" in result.stdout


def test_missing_local_model_folder_is_a_clear_error(tmp_path):
    result = run_cli(
        "backbone=t5_small", f"backbone.path={tmp_path}/nope", "logger=none", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode == 2 and "backbone.path=" in result.stderr and "no such folder" in result.stderr


def test_a_run_saved_under_the_old_group_name_reads_resumes_and_compares_as_todays(tmp_path):
    """Runs written while FPT's stages were the `schedule` group: their config validates under
    `stages` with no note of settings taking defaults, a resume finds no difference, ptlab-compare
    reads their overrides under today's name; an old name in a reuse's overrides or in a user's
    experiment file is one line that names the new one."""
    from ptlab.config.compose import compose
    from ptlab.config.difference import config_difference
    from ptlab.config.saved import load_saved_config
    from ptlab.lab.run_record import read_run

    composed = compose_config(["backbone=tiny_t5", "stages=fpt"])
    today = OmegaConf.to_container(composed)
    old = {("schedule" if key == "stages" else key): value for key, value in today.items()}
    assert list(old)[list(today).index("stages")] == "schedule"
    said = []
    config = load_saved_config(old, "old/config.yaml", say=said.append)
    assert config.stages == to_object(composed).stages and config.stages.name == "fpt"
    assert said == []
    with pytest.raises(ConfigError, match=r"^'schedule=constant': the group 'schedule' is now 'stages' .*"
                                          r"write 'stages=constant'$"):  # fmt: skip
        load_saved_config(old, "old/config.yaml", ["schedule=constant"])
    assert config_difference(old, today) is None
    current = {**today, "stages": {**today["stages"], "score_examples": 7}}
    assert config_difference(old, current) == "stages.score_examples: 1000 -> 7"
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- schedule=fpt\n- +schedule.with_decoder=true\n")
    OmegaConf.save(OmegaConf.create(old), tmp_path / ".hydra" / "config.yaml")
    record = read_run(tmp_path)
    assert record.overrides == {"stages": "fpt", "stages.with_decoder": "true"}
    assert "schedule" not in record.config and record.config["stages"]["name"] == "fpt"

    # a user's own experiment file that still names the old group: Hydra's line, pointed to the new name
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    for name, body in {"old_override": "defaults:\n  - override /schedule: fpt\n",
                       "old_node": "schedule:\n  score_examples: 8\n"}.items():  # fmt: skip
        (tmp_path / "conf" / "experiment" / f"{name}.yaml").write_text("# @package _global_\n" + body)
        pointer = r"\(the group 'schedule' is now 'stages': FPT's stages of partial models; .*\)$"
        with pytest.raises(ConfigError, match=rf"^In 'experiment/{name}': .*'schedule'.* {pointer}"):
            compose([f"experiment={name}"], config_dirs=[str(tmp_path / "conf")])

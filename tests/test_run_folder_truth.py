"""A run folder is the whole truth: ptlab-eval and ptlab-predict score a run with the config it ran
with (its .hydra/config.yaml), not today's conf/ or defaults; a task from the user's own config
folder needs no search path at reuse; checkpoints/best alone, copied anywhere, is enough to score;
overrides go on top and are said; the run records the code that ran."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import yaml
from test_scale_out import QUICK, cli

from ptlab.config.saved import load_saved_config
from ptlab.config.schema import DataConfig
from ptlab.errors import ConfigError
from ptlab.lab.saved_run import saved_config

EVAL = ("-c", "from ptlab.cli.tools import eval_main; eval_main()")
PREDICT = ("-c", "from ptlab.cli.tools import predict_main; predict_main()")
TASK = {
    "defaults": ["/schema_task@_here_", "_self_"],
    "name": "reviews",
    "local": {"format": "tsv", "train": "glue/sst2/train.tsv", "validation": "glue/sst2/dev.tsv"},
    "template": "review: {sentence}",
    "verbalizers": ["bad", "good"],
    "metrics": ["acc"],
    "main_metric": "acc",
}


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """A tiny T5 run of a task that lives in the user's own config folder."""
    root = tmp_path_factory.mktemp("truth")
    (root / "my_conf" / "task").mkdir(parents=True)
    (root / "my_conf" / "task" / "reviews.yaml").write_text(yaml.safe_dump(TASK))
    run_dir = root / "run"
    args = ["--config-dir", str(root / "my_conf"), *QUICK, "task=reviews", "trainer.max_steps=4",
            "trainer.eval_every=2", "data.max_source_length=40", f"hydra.run.dir={run_dir}"]  # fmt: skip
    result = cli(args, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return root, run_dir


def scores(result):
    return [json.loads(line)["scores"] for line in result.stdout.splitlines() if line.startswith("{")]


def test_eval_and_predict_read_the_runs_config_after_its_task_file_changed(user_run, tmp_path):
    root, run_dir = user_run
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = tmp_path / "in.jsonl"
    rows.write_text(
        "".join(json.dumps({"sentence": s}) + "\n" for s in ["a fine film", "dull and long", "ok"])
    )
    before = cli([str(run_dir), "--input", str(rows)], launcher=PREDICT, timeout=300)
    assert before.returncode == 0, before.stderr[-2000:]
    edited = {**TASK, "template": "something else entirely: {sentence}", "verbalizers": ["no", "yes"]}
    (root / "my_conf" / "task" / "reviews.yaml").write_text(yaml.safe_dump(edited))
    evaluated = cli([str(run_dir)], launcher=EVAL, timeout=300)  # no --config-dir, no search path
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    saved = json.loads((run_dir / "eval" / "reviews_validation.json").read_text())
    assert saved["metrics"]["acc"] == summary["best"]["acc"]
    after = cli([str(run_dir), "--input", str(rows)], launcher=PREDICT, timeout=300)
    assert after.returncode == 0, after.stderr[-2000:]
    assert scores(after) == scores(before) and len(scores(after)) == 3
    assert "overridden" not in after.stderr


def test_the_prompt_folder_alone_copied_anywhere_scores_like_the_run(user_run, tmp_path):
    _, run_dir = user_run
    copied = tmp_path / "somewhere" / "best"
    shutil.copytree(run_dir / "checkpoints" / "best", copied)
    evaluated = cli([str(copied)], launcher=EVAL, cwd=tmp_path, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    best = json.loads((run_dir / "summary.json").read_text())["best"]["acc"]
    assert json.loads((copied / "eval" / "reviews_validation.json").read_text())["metrics"]["acc"] == best
    record = json.loads((copied / "prompt_config.json").read_text())
    assert record["config"]["task"]["template"] == "review: {sentence}"
    assert record["config"]["data"]["max_source_length"] == 40
    assert record["code"]["ptlab"] and "commit" in record["code"]


def test_overrides_go_on_top_and_are_said(user_run):
    _, run_dir = user_run
    said = []
    config = saved_config(run_dir, ["data.max_eval_examples=8", "hardware.num_threads=1"], say=said.append)
    assert config.data.max_eval_examples == 8 and config.task.template == "review: {sentence}"
    assert (
        len(said) == 1 and "data.max_eval_examples: 64 -> 8" in said[0] and "hardware.num_threads" in said[0]
    )
    with pytest.raises(ConfigError, match="recipe changes what was trained"):
        saved_config(run_dir, ["recipe=smop"], say=said.append)


def test_a_changed_default_does_not_change_a_saved_run(user_run, monkeypatch):
    _, run_dir = user_run
    field = DataConfig.__dataclass_fields__["max_source_length"]
    monkeypatch.setattr(field, "default", 7)  # a newer ptlab with another default
    assert saved_config(run_dir, say=lambda line: None).data.max_source_length == 40
    assert dataclasses.fields(DataConfig)  # the schema itself still builds


def test_an_older_run_gets_todays_defaults_for_new_keys_and_a_removed_key_is_one_line(user_run):
    _, run_dir = user_run
    saved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    older = json.loads(json.dumps(saved))
    del older["trainer"]["grad_clip"], older["task"]["local"]["encoding"]
    said = []
    config = load_saved_config(older, "old/config.yaml", say=said.append)
    assert config.trainer.grad_clip == 1.0 and config.task.local.encoding == "utf-8"
    assert said == ["old/config.yaml was written by an older ptlab; these settings take today's defaults: "
                    "task.local.encoding, trainer.grad_clip"]  # fmt: skip
    removed = json.loads(json.dumps(saved))
    removed["trainer"]["warmup_steps"] = 10
    with pytest.raises(
        ConfigError, match=r"old/config.yaml: trainer.warmup_steps is not a setting of this ptlab"
    ):
        load_saved_config(removed, "old/config.yaml", say=said.append)


def test_a_folder_that_ptlab_did_not_write_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="has neither .hydra/config.yaml"):
        saved_config(tmp_path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = cli(
        [*QUICK, "trainer.max_steps=4", "trainer.eval_every=2", f"hydra.run.dir={run_dir}"], timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def error_line(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("ptlab: error:")]
    return line


def test_a_prompt_on_other_weights_behind_the_same_name_is_refused_unless_meant(finished_run):
    record = json.loads((finished_run / "checkpoints" / "best" / "prompt_config.json").read_text())
    other = "backbone.init_seed=1"  # tiny_t5 again, other random weights
    line = error_line(cli([str(finished_run), other], launcher=EVAL, timeout=300))
    assert f"trained on backbone weights and tokenizer {record['fingerprint']}" in line
    assert "--allow-other-weights" in line and line.count("-") >= 2
    allowed = cli([str(finished_run), other, "--allow-other-weights"], launcher=EVAL, timeout=300)
    assert allowed.returncode == 0, allowed.stderr[-2000:]


def test_a_resume_onto_other_weights_or_another_config_is_one_line_naming_the_difference(finished_run):
    again = [*QUICK, "trainer.max_steps=6", "trainer.eval_every=2", f"hydra.run.dir={finished_run}"]
    line = error_line(cli([*again, "backbone.init_seed=1"], timeout=300))
    assert (
        "trainer.resume: the checkpoint in" in line and "other weights behind the same name or path" in line
    )
    line = error_line(cli([*again, "trainer.lr=0.1"], timeout=300))
    assert "trained with another config (trainer.lr: 0.003 -> 0.1)" in line and "trainer.resume=false" in line


def test_a_finished_run_is_not_skipped_onto_other_model_shapes(finished_run):
    line = error_line(cli([*QUICK, "trainer.max_steps=4", "++backbone.random_init.d_model=48",
                           f"hydra.run.dir={finished_run}"], timeout=300))  # fmt: skip
    assert "already finished" not in line and "does not fit" not in line
    assert "backbone.random_init.d_model: 32 -> 48" in line or "hidden_size=32" in line
    skipped = cli([*QUICK, "trainer.max_steps=4", "trainer.eval_every=2", f"hydra.run.dir={finished_run}"],
                  timeout=300)  # fmt: skip
    assert skipped.returncode == 0 and "already finished" in skipped.stdout + skipped.stderr


def test_the_summary_records_the_code_that_ran(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["code"]["ptlab"] and set(summary["code"]) == {"ptlab", "commit", "dirty"}


def test_a_latin1_csv_through_the_command_line(tmp_path):
    rows = "text,label\n" + "".join(f"très bien {i},{'good' if i % 2 else 'bad'}\n" for i in range(40))
    (tmp_path / "tweets.csv").write_bytes(rows.encode("latin-1"))
    task = ["task=sst2", "task.name=tweets", "task.template='{text}'", "task.verbalizers=[bad,good]",
            "task.label_map={}", "task.local.rename={}", "task.local.format=null", "task.hub.path=null",
            f"data.dir={tmp_path}", "task.local.train=tweets.csv", "task.local.validation=null"]  # fmt: skip
    run = [*QUICK, *task, "trainer.max_steps=2", "trainer.eval_every=2", f"hydra.run.dir={tmp_path / 'run'}"]
    line = error_line(cli(run, timeout=300))
    assert "tweets.csv: byte 13 (0xe8) is not valid utf-8" in line and "task.local.encoding=latin-1" in line
    fixed = cli([*run, "task.local.encoding=latin-1"], timeout=300)
    assert fixed.returncode == 0, fixed.stderr[-2000:]

"""Several run folders over one backbone scored together (mixed-prompt inference): `ptlab-eval` and
`ptlab-predict` with several RUN_DIRs load the backbone once, score all the prompts in one pass per
batch, and give each run what it gets alone; a folder over another backbone is one line before any
model loads."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from test_mixed_rows import runs_on
from test_scale_out import QUICK

import ptlab.training.build
from ptlab.cli.tools import eval_main, predict_main
from ptlab.model.readout import RunParts
from ptlab.training.evaluate import runs_scores
from ptlab.training.job import run

from conftest import OFFLINE_ENV, compose_config

STEPS = ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.batch_size=8", "trainer.lr=0.3"]
# two methods, three prompt lengths, three seeds, two tasks (other verbalizers and metrics)
RUNS = {
    "pt3": ["method.prompt_length=3", "seed=1"],
    "smop": ["method=smop", "method.prompt_length=2", "method.num_prompts=3", "seed=2"],
    "pt7_cola": ["method.prompt_length=7", "task=cola", "seed=3"],
}
SENTENCES = ["a gripping, beautifully shot film", "dull", "the plot goes nowhere", "fine", "ok I guess"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny T5 runs of two steps, trained in this process (offline, as the tests run), each
    folder with the composed config that Hydra would have written."""
    root = tmp_path_factory.mktemp("packed")
    with pytest.MonkeyPatch.context() as env:
        for key, value in {**OFFLINE_ENV, "WANDB_DIR": str(root)}.items():
            env.setenv(key, value)
        for name, overrides in RUNS.items():
            cfg = compose_config([*QUICK, *STEPS, *overrides])
            run(cfg, run_dir=root / name)
            (root / name / ".hydra").mkdir()  # what Hydra's app writes besides
            (root / name / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return [root / name for name in RUNS]


@pytest.fixture
def loads(monkeypatch):
    """How many times a backbone is loaded."""
    calls = []
    real = ptlab.training.build.build_backbone

    def counted(cfg):
        calls.append(cfg.name)
        return real(cfg)

    monkeypatch.setattr(ptlab.training.build, "build_backbone", counted)
    return calls


def task_of(run_dir):
    return "cola" if "cola" in run_dir.name else "sst2"


def test_eval_of_several_folders_gives_each_its_metrics_alone_with_one_backbone(runs, capsys, loads):
    alone = {}
    for run_dir in runs:
        eval_main([str(run_dir), "hardware.num_threads=1"])
        alone[run_dir] = json.loads((run_dir / "eval" / f"{task_of(run_dir)}_validation.json").read_text())
    assert len(loads) == len(runs)
    capsys.readouterr()
    eval_main([*map(str, runs), "split=validation", "hardware.num_threads=1"])
    assert len(loads) == len(runs) + 1  # one load for all the folders
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines] == [str(run_dir) for run_dir in runs]
    for run_dir, line in zip(runs, lines):
        together = json.loads((run_dir / "eval" / f"{task_of(run_dir)}_validation.json").read_text())
        assert together["examples"] == alone[run_dir]["examples"] == 64
        assert together["metrics"].keys() == alone[run_dir]["metrics"].keys()
        for key, value in alone[run_dir]["metrics"].items():
            assert together["metrics"][key] == pytest.approx(value, abs=1e-6), (run_dir, key)
        assert f"{task_of(run_dir)} validation (64 examples)" in line
    assert "mcc" in alone[runs[2]]["metrics"]  # the CoLA run's metrics; SMoP's router statistics too:
    assert len(alone[runs[1]]["metrics"]) > len(alone[runs[0]]["metrics"])


def predictions(capsys, argv):
    capsys.readouterr()
    predict_main(argv)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_predict_of_several_folders_gives_each_run_its_scores_alone(runs, tmp_path, capsys, loads):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"sentence": s, "id": i}) + "\n" for i, s in enumerate(SENTENCES)))
    alone = {run_dir: predictions(capsys, [str(run_dir), "--input", str(source)]) for run_dir in runs}
    loads.clear()
    together = predictions(capsys, [*map(str, runs), "--input", str(source), "--batch-size", "4"])
    assert len(loads) == 1
    assert [row["run"] for row in together] == [str(run_dir) for run_dir in runs for _ in SENTENCES]
    for run_dir in runs:
        mine = [row for row in together if row["run"] == str(run_dir)]
        assert [row["id"] for row in mine] == list(range(len(SENTENCES)))
        for got, expected in zip(mine, alone[run_dir]):
            assert "run" not in expected and got["sentence"] == expected["sentence"]
            assert got["scores"].keys() == expected["scores"].keys()
            assert got["scores"] == pytest.approx(expected["scores"], abs=1e-5)
            assert got["prediction"] == expected["prediction"]
    assert set(together[-1]["scores"]) == {"unacceptable", "acceptable"}  # the CoLA run's verbalizers


def test_predict_checks_each_runs_template_fields_in_one_line(runs, tmp_path, capsys, monkeypatch):
    other = tmp_path / "other_fields"
    shutil.copytree(runs[0], other)
    config = yaml.safe_load((other / ".hydra" / "config.yaml").read_text())
    config["task"]["template"] = "review: {text}"
    (other / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"sentence": "fine"}) + "\n")
    monkeypatch.setattr(ptlab.training.build, "build_backbone", lambda cfg: pytest.fail("a model loaded"))
    with pytest.raises(SystemExit) as exit_code:
        predict_main([str(runs[0]), str(other), "--input", str(source)])
    err = capsys.readouterr().err
    assert exit_code.value.code == 2 and err.count("\n") == 1
    assert f"row 1: no field 'text' (it has ['sentence']): {other}'s task 'sst2' reads ['text']" in err


@pytest.mark.parametrize(
    "key,value,named",
    [
        ("backbone", None, "backbone.family: 'seq2seq' -> 'causal'"),  # another backbone: tiny LLaMA
        ("hardware", {"num_threads": 2}, "hardware.num_threads: 1 -> 2"),
    ],
)
def test_a_folder_over_another_backbone_is_one_line_before_any_model_loads(
    runs, tmp_path, capsys, monkeypatch, key, value, named
):
    other = tmp_path / "other"
    shutil.copytree(runs[0], other)
    config = yaml.safe_load((other / ".hydra" / "config.yaml").read_text())
    if value is None:
        llama = compose_config(["backbone=tiny_llama", "backbone.dropout=false"]).backbone
        config["backbone"] = OmegaConf.to_container(llama, resolve=True)
    else:
        config[key].update(value)
    (other / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"sentence": "fine"}) + "\n")
    monkeypatch.setattr(ptlab.training.build, "build_backbone", lambda cfg: pytest.fail("a model loaded"))
    for command in (eval_main, predict_main):
        argv = [str(runs[0]), str(runs[1]), str(other)]
        with pytest.raises(SystemExit) as exit_code:
            command(argv if command is eval_main else [*argv, "--input", str(source)])
        err = capsys.readouterr().err
        assert exit_code.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"ptlab: error: {other} differs from {runs[0]} in {named}")
        assert "separate commands" in err


def test_runs_scores_of_three_runs_equal_each_runs_scores_alone():
    """Prompt tuning of two lengths and deep prompts, two tasks, on the tiny causal model; batches
    of three rows mix the runs' rows and split them."""
    backbone, runs = runs_on("tiny_llama")
    runs = runs[:3]
    together = runs_scores(
        backbone,
        [(RunParts(readout, method), items) for readout, method, items in runs],
        3,
        torch.device("cpu"),
        contextlib.nullcontext,
    )
    with torch.no_grad():
        for (readout, method, items), scores in zip(runs, together):
            for example, got in zip(items, scores, strict=True):
                alone = backbone.score(readout, method, backbone.collate(readout, [example]))[0]
                assert got.shape == (len(readout.verbalizers),)
                torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)

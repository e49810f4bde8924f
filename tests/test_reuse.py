"""Reusing a trained prompt from its run folder alone: ptlab-eval, ptlab-predict, ptlab-export (PEFT)
and method.init_from, each against an independent computation, and their one-line refusals."""

from __future__ import annotations

import copy
import csv
import io
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_scale_out import QUICK, cli

import ptlab
from ptlab.data.examples import Example
from ptlab.lab.saved_run import saved_config

from conftest import SHARED_DATA
from helpers import causal_target_logits, seq2seq_logits

TRAIN = [*QUICK, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.batch_size=8", "trainer.lr=0.3"]
FAMILIES = {"t5": "backbone=tiny_t5", "llama": "backbone=tiny_llama"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trained run folders: prompt tuning on tiny T5 and tiny LLaMA, SuperPos and SMoP on T5, a
    prompt-tuning run on tiny BERT (the encoder family) and deep prompts on tiny LLaMA."""
    root = tmp_path_factory.mktemp("runs")
    specs = {
        "t5": ["backbone=tiny_t5"],
        "llama": ["backbone=tiny_llama"],
        "superpos": ["backbone=tiny_t5", "method=superpos"],
        "smop": ["backbone=tiny_t5", "method=smop"],
        "bert": ["backbone=tiny_bert"],
        "deep_llama": ["backbone=tiny_llama", "method=deep_prompt", "method.reparam=true"],
    }
    for name, overrides in specs.items():
        result = cli([*TRAIN, *overrides, f"hydra.run.dir={root / name}"], timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
    return root


def best_prompt(run_dir):
    return load_file(run_dir / "checkpoints" / "best" / "prompt.safetensors")


def pipeline_with_saved_prompt(run_dir, splits=()):
    """The run's pipeline built directly, with the saved tensors loaded by hand."""
    pipeline = ptlab.build(saved_config(run_dir), splits=splits)
    state = {k[len("method.") :]: v for k, v in best_prompt(run_dir).items() if k.startswith("method.")}
    pipeline.method.load_state_dict(state)
    pipeline.backbone.eval()
    pipeline.method.eval()
    return pipeline


def test_eval_reproduces_the_runs_best_validation_score(runs):
    run_dir = runs / "t5"
    result = cli([str(run_dir)], launcher=("-c", "from ptlab.cli.tools import eval_main; eval_main()"), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((run_dir / "eval" / "sst2_validation.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert saved["metrics"]["acc"] == summary["best"]["acc"] and saved["examples"] == 64
    assert f"acc {summary['best']['acc']:.4f}" in result.stdout


def test_eval_on_another_split_and_with_overrides(runs):
    run_dir = runs / "t5"
    args = [str(run_dir), "split=train", "data.max_train_examples=16"]
    result = cli(args, launcher=("-c", "from ptlab.cli.tools import eval_main; eval_main()"), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((run_dir / "eval" / "sst2_train.json").read_text())
    assert saved["examples"] == 16 and 0.0 <= saved["metrics"]["acc"] <= 1.0


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_predict_scores_equal_the_backbones_own_scores(runs, tmp_path, family):
    run_dir = runs / family
    rows = list(csv.DictReader((SHARED_DATA / "glue/sst2/dev.tsv").open(), delimiter="\t"))[:6]
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"sentence": r["sentence"], "id": i}) + "\n" for i, r in enumerate(rows))
    )
    launcher = ("-c", "from ptlab.cli.tools import predict_main; predict_main()")
    result = cli([str(run_dir), "--input", str(source)], launcher=launcher, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    predictions = [json.loads(line) for line in result.stdout.splitlines()]
    pipeline = pipeline_with_saved_prompt(run_dir)
    template, readout = pipeline.config.task.template, pipeline.readout
    ids = pipeline.backbone.tokenize_sources(readout, [template.format(sentence=r["sentence"]) for r in rows])
    with torch.no_grad():
        for prediction, row_ids in zip(predictions, ids):  # one example per batch: no padding involved
            batch = pipeline.backbone.collate(readout, [Example(source_ids=row_ids, label=0)])
            expected = pipeline.backbone.score(readout, pipeline.method, batch)[0]
            got = torch.tensor(list(prediction["scores"].values()))
            assert torch.allclose(got, expected, atol=1e-4)
            assert prediction["prediction"] == ["negative", "positive"][int(expected.argmax())]
    assert [p["id"] for p in predictions] == list(range(6))  # input fields kept, in order


def test_predict_reads_text_lines_and_writes_csv(runs, tmp_path):
    out = tmp_path / "out.csv"
    launcher = ("-c", "from ptlab.cli.tools import predict_main; predict_main()")
    result = cli([str(runs / "t5"), "--input", "-", "--output", str(out)], launcher=launcher, timeout=300,
                 input="a gripping film\n\nflat and dull\n")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["sentence"] for r in table] == ["a gripping film", "flat and dull"]
    assert set(table[0]) == {"sentence", "prediction", "score_negative", "score_positive"}


@pytest.mark.parametrize(
    "rows,message",
    [
        ('{"text": "x"}\n', "row 1: no field 'sentence' (it has ['text'])"),
        ('{"sentence": "x"}\nnot json\n', "in.jsonl, line 2: not valid JSON"),
    ],
)
def test_predict_refuses_bad_rows_in_one_line(runs, tmp_path, rows, message):
    source = tmp_path / "in.jsonl"
    source.write_text(rows)
    launcher = ("-c", "from ptlab.cli.tools import predict_main; predict_main()")
    result = cli([str(runs / "t5"), "--input", str(source)], launcher=launcher, timeout=300)
    assert result.returncode == 2 and message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("family", ["t5", "llama", "superpos", "deep_llama"])
def test_exported_peft_adapter_scores_like_ptlab(runs, tmp_path, family):
    run_dir, out = runs / family, tmp_path / "adapter"
    launcher = ("-c", "from ptlab.cli.tools import export_main; export_main()")
    result = cli([str(run_dir), str(out)], launcher=launcher, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    pipeline = pipeline_with_saved_prompt(run_dir)
    backbone, readout = pipeline.backbone, pipeline.readout
    peft = PeftModel.from_pretrained(copy.deepcopy(backbone.model), str(out)).eval()
    texts = ["a gripping, beautifully shot film", "the plot goes nowhere at all"]
    ids = backbone.tokenize_sources(readout, [f"sst2 sentence: {t}" for t in texts])
    ids = [row[:16] for row in ids]  # equal lengths: PEFT's causal path takes no padding
    batch = backbone.collate(readout, [Example(source_ids=row, label=1) for row in ids])
    n = pipeline.method.num_tokens
    with torch.no_grad():
        ours = backbone.output_logits(readout, pipeline.method, batch)
        if pipeline.config.backbone.family == "seq2seq":
            theirs = seq2seq_logits(peft, batch)
        else:
            theirs = causal_target_logits(peft, batch, n)
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "name,message",
    [
        ("smop", "method 'smop' gives each input its own prompt"),
        ("bert", "the encoder family puts the prompt"),
    ],
)
def test_export_refuses_what_peft_cannot_hold(runs, tmp_path, name, message):
    launcher = ("-c", "from ptlab.cli.tools import export_main; export_main()")
    result = cli([str(runs / name), str(tmp_path / "out")], launcher=launcher, timeout=300)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_init_from_starts_a_run_from_a_trained_prompt(runs, tmp_path):
    source = best_prompt(runs / "t5")["method.prompt_embeds"]
    pipeline = ptlab.build(
        saved_config(runs / "t5", [f"method.init_from={runs / 't5'}", "seed=7"]), splits=()
    )  # another seed: its own initial draw is replaced by the trained prompt
    assert torch.equal(pipeline.method.prompt_embeds.detach(), source)
    result = cli([*TRAIN, "backbone=tiny_t5", f"method.init_from={runs / 't5'}", "task=cola",
                  f"hydra.run.dir={tmp_path / 'cola'}"], timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    "override,message",
    [
        ("method.prompt_length=7", "its prompt_embeds has shape (20, 32), this run's has (7, 32)"),
        ("method=smop", "holds a prompt_tuning prompt; this run's method is smop"),
    ],
)
def test_init_from_refuses_a_prompt_that_does_not_fit(runs, override, message):
    result = cli([*TRAIN, "backbone=tiny_t5", f"method.init_from={runs / 't5'}", override], timeout=300)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_reuse_commands_name_a_bad_run_folder(tmp_path):
    launcher = ("-c", "from ptlab.cli.tools import eval_main; eval_main()")
    missing = cli([str(tmp_path / "nowhere")], launcher=launcher, timeout=120)
    assert missing.returncode == 2 and "no such run or prompt folder" in missing.stderr
    bare = cli([str(tmp_path)], launcher=launcher, timeout=120)
    assert bare.returncode == 2 and "has neither .hydra/config.yaml (a run folder) nor" in bare.stderr

"""Bad input gets one clear line before any model loads: numbers out of range, keys no schema knows,
hardware that is not there; a non-finite loss stops with one line naming the step and the fix."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_scale_out import QUICK, cli
from transformers import AutoModelForSeq2SeqLM

from ptlab.config.schema import to_object
from ptlab.data import examples as data_module
from ptlab.data.examples import load_raw_splits
from ptlab.data.tasks import label_index
from ptlab.errors import ConfigError, TrainingFault
from ptlab.model.loading import load_model_and_tokenizer
from ptlab.training import checkpoint as checkpoint_module
from ptlab.training import loop
from ptlab.training.job import run

from conftest import SHARED_DATA, compose_config

OUT_OF_RANGE = [
    (["trainer.lr=-1"], r"trainer.lr=-1.0 must be a number in \(0, inf\]"),
    (["trainer.lr=0"], r"trainer.lr=0.0 must be a number in \(0, inf\]"),
    (["trainer.lr=nan"], r"trainer.lr=nan must be"),
    (["trainer.lr=inf"], r"trainer.lr=inf must be"),
    (["trainer.weight_decay=-0.1"], r"trainer.weight_decay=-0.1 must be a number in \[0, inf\]"),
    (["trainer.grad_clip=-1"], r"trainer.grad_clip=-1.0 must be .*\(0 or null: no clipping\)"),
    (["trainer.patience=-1"], r"trainer.patience=-1 must be .*null: no early stopping"),
    (["trainer.max_steps=null", "trainer.epochs=-1"], r"trainer.epochs=-1.0 must be a number in \(0, inf\]"),
    (["trainer.max_steps=null", "trainer.epochs=0"], r"trainer.epochs=0.0 must be"),
    (["trainer.max_steps=0"], r"trainer.max_steps=0 must be a number in \[1, inf\]"),
    (["trainer.eval_batch_size=0"], r"trainer.eval_batch_size=0 must be"),
    (["trainer.max_new_tokens=0"], r"trainer.max_new_tokens=0 must be"),
    (["trainer.warmup_ratio=1"], r"trainer.warmup_ratio=1.0 must be a number in \[0, 1\)"),
    (["hardware.num_threads=-1"], r"hardware.num_threads=-1 must be a number in \[1, inf\]"),
    (["hardware.num_threads=0"], r"hardware.num_threads=0 must be"),
    (["data.max_train_examples=0"], r"data.max_train_examples=0 must be a number in \[1, inf\]"),
    (["data.max_eval_examples=-5"], r"data.max_eval_examples=-5 must be"),
    (["data.validation_fraction=1.5"], r"data.validation_fraction=1.5 must be a number in \(0, 1\)"),
    (["data.validation_fraction=0"], r"data.validation_fraction=0.0 must be"),
    (["stages=fpt", "stages.score_examples=0"], r"stages.score_examples=0 must be"),
    (["method=smop", "method.noise_sigma=-1"], r"method.noise_sigma=-1.0 must be"),
    (["method=smop", "method.router_dropout=1"], r"method.router_dropout=1.0 must be a number in \[0, 1\)"),
    (["method=smop", "method.consistency_weight=-1"], r"method.consistency_weight=-1.0 must be"),
]
UNKNOWN_KEYS = [
    (
        ["+trainer.foo=1"],
        r"trainer.foo is not a setting of trainer \(it has: batch_size, .*\): fix its spelling",
    ),
    (["+data.max_len=5"], r"data.max_len is not a setting of data \(did you mean data.max_source_length\?"),
    (["+trainer.learning_rate=0.3"], r"trainer.learning_rate is not a setting of trainer \(did you mean trainer.lr\?"),
    (["+method.num_virtual_tokens=5"], r"did you mean method.prompt_length\?"),
    (["+method.lenght=5"], r"method.lenght is not a setting of method \(did you mean method.prompt_length\? it has: "),
    (["+hardware.gpus=2"], r"hardware.gpus is not a setting of hardware"),
    (["+task.local.split=x"], r"task.local.split is not a setting of task.local"),
    (["+stages.stages.0.extra=1", "stages=fpt"], r"stages.stages.0.extra is not a setting"),
    (["+seeds=3"], r"seeds is not a setting of the config \(did you mean seed\? it has: backbone, data, "),
]


@pytest.mark.parametrize("overrides, message", OUT_OF_RANGE + UNKNOWN_KEYS)
def test_bad_values_and_unknown_keys_are_refused_naming_them(overrides, message):
    with pytest.raises(ConfigError, match=message):
        to_object(compose_config(overrides))


def test_free_form_mappings_still_take_new_keys():
    config = to_object(compose_config(["backbone=tiny_t5", "+backbone.random_init.dropout_rate=0.0"]))
    assert config.backbone.random_init["dropout_rate"] == 0.0


def one_line_error(result, code: int) -> str:
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("ptlab: error:")]
    return line


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.lr=-1"], "ptlab: error: trainer.lr=-1.0 must be a number in (0, inf]"),
        (["+trainer.foo=1"], "ptlab: error: trainer.foo is not a setting of trainer"),
        (["backbone.family=decoder"], "ptlab: error: backbone.family='decoder' is not registered; known: ['causal', 'encoder', 'seq2seq']"),
        (
            ["hardware=multi_gpu"],
            "ptlab: error: hardware=multi_gpu needs CUDA, and no CUDA device is visible",
        ),
        (["hardware=gpu"], "ptlab: error: hardware=gpu needs CUDA, and no CUDA device is visible"),
    ],
)
def test_the_command_line_answers_bad_input_in_one_line(tmp_path, overrides, message):
    if "cuda" in message.lower() and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = cli([*QUICK, *overrides, f"hydra.run.dir={tmp_path}"], timeout=300)
    assert one_line_error(result, 2).startswith(message)


def test_a_non_finite_loss_stops_in_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    steps = ["trainer.max_steps=20", "trainer.eval_every=1", "trainer.lr=1e30", "trainer.grad_clip=null"]
    result = cli([*QUICK, *steps, f"hydra.run.dir={tmp_path}"], timeout=300)
    line = one_line_error(result, 1)
    assert "ptlab: error: training loss is" in line and "lower trainer.lr or set trainer.grad_clip" in line
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / 'last'}" in line
    assert (tmp_path / "checkpoints" / "last" / "state.pt").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run trained for 2 steps from the command line; each test damages a copy of it."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = cli(
        [*QUICK, "trainer.max_steps=2", "trainer.eval_every=2", f"hydra.run.dir={run_dir}"], timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def trained_once(tmp_path, trained):
    """A copy of the trained run's folder, as its own run folder."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda state: state.write_bytes(state.read_bytes()[: len(state.read_bytes()) // 2]),
            "cannot be read",
        ),
        (lambda state: state.write_bytes(b""), "cannot be read"),
        (
            lambda state: torch.save({"weights": 1}, state),
            "cannot be read (ValueError: not a ptlab checkpoint)",
        ),
    ],
    ids=["truncated", "empty", "not-a-checkpoint"],
)
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_the_fix(tmp_path, trained, damage, message):
    run_dir = trained_once(tmp_path, trained)
    state = run_dir / "checkpoints/last/state.pt"
    damage(state)
    result = cli(
        [*QUICK, "trainer.max_steps=4", "trainer.eval_every=2", f"hydra.run.dir={run_dir}"], timeout=300
    )
    line = one_line_error(result, 2)
    assert f"ptlab: error: {state} {message}" in line and "trainer.resume=false" in line


class RunsCode:
    """A pickled object whose unpickling runs a shell command (issue #29: os.system in __reduce__)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line_and_runs_nothing(tmp_path, trained):
    run_dir = trained_once(tmp_path, trained)
    state, marker = run_dir / "checkpoints/last/state.pt", tmp_path / "code-ran"
    saved = checkpoint_module.load_training_state(state.parent)
    torch.save({**saved, "train_state": {**saved["train_state"], "note": RunsCode(marker)}}, state)
    result = cli(
        [*QUICK, "trainer.max_steps=4", "trainer.eval_every=2", f"hydra.run.dir={run_dir}"], timeout=300
    )
    line = one_line_error(result, 2)
    assert f"ptlab: error: {state} holds objects other than tensors and plain values (posix.system)" in line
    assert "trainer.resume=false" in line and not marker.exists()
    torch.load(state, weights_only=False)  # what a resume did before: the payload is real
    assert marker.exists()


def test_a_checkpoint_of_another_shape_is_one_line(tmp_path, trained):
    run_dir = trained_once(tmp_path, trained)
    other = ["++backbone.random_init.d_model=48", "trainer.max_steps=4", f"hydra.run.dir={run_dir}"]
    line = one_line_error(cli([*QUICK, *other], timeout=300), 2)
    assert "the checkpoint in" in line and "was trained with hidden_size=32, this run has 48" in line
    assert "trainer.resume=false" in line


def test_a_torn_metrics_line_and_a_stray_temporary_checkpoint_do_not_stop_a_resume(tmp_path, trained):
    run_dir = trained_once(tmp_path, trained)
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "split": "tra')  # killed mid-write
    (run_dir / "checkpoints/.last.tmp").mkdir()  # a write cut short by a full disk
    result = cli(
        [*QUICK, "trainer.max_steps=4", "trainer.eval_every=2", f"hydra.run.dir={run_dir}"], timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "is cut short" in result.stdout + result.stderr and not (run_dir / "checkpoints/.last.tmp").exists()
    )
    steps = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(line.startswith("{") and line.endswith("}") for line in steps)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["method.prompt_length=100000"],
            "+ 100000 prompt tokens = 100048 exceeds the backbone's 2048 positions",
        ),
        (
            ["backbone.path=/models/t5"],
            "is built with random weights (backbone.random_init), so backbone.path=",
        ),
    ],
    ids=["seq2seq-prompt-length", "path-on-random-init"],
)
def test_sizes_and_paths_that_cannot_work_are_refused_before_training(tmp_path, overrides, message):
    result = cli([*QUICK, *overrides, f"hydra.run.dir={tmp_path / 'run'}"], timeout=300)
    assert message in one_line_error(result, 2)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_folder_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = cli([*QUICK, f"hydra.run.dir={blocker / 'run'}"], timeout=300)
    line = one_line_error(result, 2)
    assert f"cannot write {blocker / 'run'} (Not a directory)" in line and "hydra.run.dir=" in line


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, trained, monkeypatch):
    run_dir = trained_once(tmp_path, trained)
    before = (run_dir / "checkpoints/last/state.pt").read_bytes()

    def disk_full(obj, path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    config = compose_config([*QUICK, "trainer.max_steps=4", "trainer.eval_every=2"])
    with pytest.raises(TrainingFault, match="No space left on device.*the previous one .* is intact"):
        run(config, run_dir=run_dir)
    assert (run_dir / "checkpoints/last/state.pt").read_bytes() == before
    assert not (run_dir / "checkpoints/.last.tmp").exists()


def test_out_of_memory_in_a_step_is_one_line_with_the_sizes_to_lower(tmp_path, monkeypatch):
    def exhausted(runs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(loop, "step", exhausted)
    with pytest.raises(TrainingFault) as caught:
        run(compose_config([*QUICK, "trainer.batch_size=8"]), run_dir=tmp_path)
    message = str(caught.value)
    assert message.startswith(
        "out of memory in a training step (CUDA out of memory. Tried to allocate 20.00 GiB)"
    )
    assert "trainer.batch_size=8, data.max_source_length=48: lower them" in message and "\n" not in message


def data_dir_with(tmp_path, task, damage):
    """A data.dir holding a small real slice of the task's official files, then damaged."""
    files = {
        "sst2": ("glue/sst2/train.tsv", "glue/sst2/dev.tsv"),
        "cb": ("superglue/cb/train.jsonl", "superglue/cb/val.jsonl"),
    }[task]
    for name in files:
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join((SHARED_DATA / name).read_text().splitlines(keepends=True)[:20]))
    damage(tmp_path / files[0])
    return tmp_path / files[0]


def replace_text(old, new):
    return lambda path: path.write_text(path.read_text().replace(old, new))


BAD_FILES = [
    ("cb", lambda p: p.write_text(""), "is empty: give the task's file with its rows"),
    ("cb", lambda p: p.write_text(p.read_text()[:-40]), ", line 20: not valid JSON"),
    ("cb", lambda p: p.write_text(p.read_text() + "[1, 2]\n"), ", line 21: a JSON list, not an object"),
    ("cb", replace_text('"premise"', '"context"'), "no field 'premise' in its rows (they have ['context',"),
    ("cb", replace_text('"label": "', '"label": "x-'), "row 1: task 'cb': label 'x-"),
    (
        "sst2",
        lambda p: p.write_text(p.read_text() + "an extra\tcolumn\there\n"),
        "cannot be read as tsv: Error tokenizing data",
    ),
    (
        "sst2",
        lambda p: p.write_text(p.read_text() + "no label at all\t\n"),
        ", row 20: field 'label' is empty",
    ),
    (
        "sst2",
        replace_text("sentence\tlabel", "text\tlabel"),
        "no field 'sentence' in its rows (they have ['label', 'text'])",
    ),
]


@pytest.mark.parametrize("task, damage, message", BAD_FILES, ids=["empty", "cut-line", "not-an-object", "renamed-field",
                                                                  "unknown-label", "extra-column", "missing-label", "renamed-column"])  # fmt: skip
def test_a_bad_data_file_is_named_with_its_row_before_any_model_loads(tmp_path, task, damage, message):
    bad = data_dir_with(tmp_path, task, damage)
    config = to_object(compose_config([f"task={task}", f"data.dir={tmp_path}"]))
    with pytest.raises(ConfigError) as caught:
        load_raw_splits(config.task, config.data)
    assert str(caught.value).startswith(str(bad)) and message in str(caught.value)


@pytest.mark.parametrize(
    "labels, message",
    [
        (["1", "0", "zz", "7", "zz"], "row 3: task 'sst2': label 'zz' is neither a verbalizer"),
        (["1", "0", "7", "zz", "7"], "row 3: task 'sst2': label '7' is not a class of the 2 verbalizers"),
        (["1", None, ""], "row 2: field 'label' is empty"),
        (["1", "0", ""], "row 3: field 'label' is empty"),
        ([1.0, 0.0, float("nan")], "row 3: task 'sst2': label nan is neither a verbalizer"),
    ],
    ids=["unknown-first", "out-of-range-first", "null", "empty-string", "nan"],
)
def test_the_first_row_with_a_bad_label_is_named(labels, message):
    config = to_object(compose_config(["task=sst2"]))
    rows = data_module.Dataset.from_dict({"sentence": ["a", "b", "c", "d", "e"][: len(labels)], "label": labels})
    with pytest.raises(ConfigError, match=f"^train.tsv, {message}"):
        data_module.check_rows(rows, config.task, "train.tsv")


def test_the_command_line_names_a_bad_data_file_in_one_line(tmp_path):
    bad = data_dir_with(tmp_path / "data", "cb", replace_text('"premise"', '"context"'))
    result = cli(
        [*QUICK, "task=cb", f"data.dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}"], timeout=300
    )
    assert f"ptlab: error: {bad}: no field 'premise'" in one_line_error(result, 2)


def record_of(run_dir):
    """Every file a run writes about itself (not its checkpoints), with its bytes."""
    names = [".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log", "summary.json"]
    return {name: (run_dir / name).read_bytes() for name in names}


@pytest.mark.parametrize("bad", [["trainer.lr=-1"], ["data.dir=/nonexistent-data"]], ids=["value", "data"])
def test_a_failed_rerun_leaves_the_earlier_runs_record_as_it_was(tmp_path, trained, bad):
    run_dir = trained_once(tmp_path, trained)
    before = record_of(run_dir)
    assert b"task sst2: local files" in before["train.log"]  # logged before the log file opened
    result = cli([*QUICK, "trainer.max_steps=4", *bad, f"hydra.run.dir={run_dir}"], timeout=300)
    one_line_error(result, 2)
    assert record_of(run_dir) == before


def test_a_failed_rerun_of_a_finished_sweep_job_keeps_its_result_and_says_so(tmp_path):
    sweep = ["-m", *QUICK, "trainer.max_steps=2", "trainer.eval_every=2", "method.prompt_length=4,5"]
    first = cli([*sweep, f"hydra.sweep.dir={tmp_path}"], timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    finished = (tmp_path / "0" / "summary.json").read_text()
    rerun = cli([*sweep, "trainer.lr=-1", f"hydra.sweep.dir={tmp_path}"], timeout=600)
    assert rerun.returncode == 1 and "ptlab: error: 2 of 2 jobs failed: job 0" in rerun.stderr
    assert (tmp_path / "0" / "summary.json").read_text() == finished
    assert "trainer.lr=-1.0 must be" in (tmp_path / "0" / "failure.json").read_text()
    again = cli([*sweep, f"hydra.sweep.dir={tmp_path}"], timeout=600)
    assert again.returncode == 0 and "already finished" in again.stdout
    assert not (tmp_path / "0" / "failure.json").exists()


def test_a_data_path_that_is_a_folder_or_unreadable_is_named(tmp_path, monkeypatch):
    data_dir_with(tmp_path, "sst2", lambda path: None)
    config = to_object(compose_config(["task=sst2", f"data.dir={tmp_path}"]))
    (tmp_path / "glue/sst2/dev.tsv").unlink()
    (tmp_path / "glue/sst2/dev.tsv").mkdir()
    with pytest.raises(ConfigError, match=r"dev.tsv: not a file \(task.local.validation of task 'sst2'\)"):
        load_raw_splits(config.task, config.data)
    (tmp_path / "glue/sst2/dev.tsv").rmdir()
    (tmp_path / "glue/sst2/dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    monkeypatch.setattr(data_module.os, "access", lambda path, mode: "train" not in str(path))
    with pytest.raises(ConfigError, match=r"train.tsv: cannot be read \(permission denied\)"):
        load_raw_splits(config.task, config.data)


def test_verbalizers_fewer_than_the_classes_are_refused_at_composition():
    with pytest.raises(
        ConfigError, match=r"task.label_map\['neutral'\]=2 is not a class of task 'cb', whose 2 "
    ):
        to_object(compose_config(["task=cb", "task.verbalizers=[sport,weather]"]))


def test_labels_that_are_the_verbalizers_or_indices_need_no_label_map():
    task = to_object(compose_config(["task=sst2", "task.verbalizers=[sport,weather,politics]"])).task
    assert [label_index(task, raw) for raw in ("sport", "politics", 1, "2", True)] == [0, 2, 1, 2, 1]
    with pytest.raises(ConfigError, match=r"label 3 is not a class of the 3 verbalizers"):
        label_index(task, 3)
    with pytest.raises(
        ConfigError, match=r"label 'music' is neither a verbalizer \['sport', 'weather', 'politics'\]"
    ):
        label_index(task, "music")


def test_a_resume_on_other_rows_than_the_checkpoints_is_refused(tmp_path, trained):
    run_dir = trained_once(tmp_path, trained)
    before = record_of(run_dir)
    result = cli([*QUICK, "trainer.max_steps=4", "data.max_train_examples=128", f"hydra.run.dir={run_dir}"],
                 timeout=300)  # fmt: skip
    line = one_line_error(result, 2)
    assert "the task's rows are not those the checkpoint in" in line and "trainer.resume=false" in line
    assert record_of(run_dir) == before
    same = cli(
        [*QUICK, "trainer.max_steps=4", "trainer.eval_every=2", f"hydra.run.dir={run_dir}"], timeout=300
    )
    assert same.returncode == 0 and "resumed from" in same.stdout


def test_a_model_folder_that_is_empty_or_lacks_its_tokenizer_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line_error(cli([*QUICK, "backbone=t5_small", f"backbone.path={empty}"], timeout=300), 2)
    assert (
        f"backbone.path='{empty}' is not a complete model folder: it has no config.json, no weights, no tokenizer"
        in line
    )
    weights_only = tmp_path / "weights"
    tiny = to_object(compose_config(["backbone=tiny_t5"])).backbone
    model, _ = load_model_and_tokenizer(tiny, AutoModelForSeq2SeqLM)
    model.save_pretrained(weights_only)
    with pytest.raises(
        ConfigError, match=r"it has no tokenizer \(it holds: config.json, .*model.safetensors\)"
    ):
        load_model_and_tokenizer(dataclasses.replace(tiny, random_init=None, path=str(weights_only)), AutoModelForSeq2SeqLM)

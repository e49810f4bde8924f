"""What ptlab-predict reads and what a reuse does with a damaged run folder: an --input file is read
as training reads a task's files (one reader: encoding, TSV quoting, text kept as written), and a
run folder whose records are damaged is one line from ptlab-eval, ptlab-predict and ptlab-export,
naming the file and what to do."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from test_scale_out import QUICK, cli

from ptlab.cli.tools import eval_main, export_main, predict_main
from ptlab.config.schema import to_object
from ptlab.data.examples import load_raw_splits

from conftest import compose_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run folder, trained once; each test copies it before damaging anything."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    args = [*QUICK, "trainer.max_steps=2", "trainer.eval_every=2", "trainer.batch_size=8", f"hydra.run.dir={run_dir}"]
    result = cli(args, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def copied(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "run")


def one_line_error(capsys, main, argv) -> str:
    """The tool's whole stderr, which must be one `ptlab: error:` line and exit status 2."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("ptlab: error: ") and err.count("\n") == 1, err
    return err


def predicted_rows(capsys, argv):
    """ptlab-predict's output rows less what it adds (`prediction`, `scores`): the input rows as read."""
    predict_main(argv)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return [{k: v for k, v in row.items() if k not in ("prediction", "scores")} for row in rows]


def training_rows(path, *overrides):
    """The file's rows as training reads them when it is the task's own file."""
    files = [f"task.local.train={path}", f"task.local.validation={path}", "task.local.format=null", *overrides]
    config = to_object(compose_config(files))
    return load_raw_splits(config.task, config.data)["train"].to_list()


ACCENTED = [{"sentence": "café was great", "label": 1}, {"sentence": "naïve, déjà vu", "label": 0}]


def test_a_latin1_csv_gives_at_predict_the_rows_training_reads(trained, tmp_path, capsys):
    source = tmp_path / "in.csv"
    pd.DataFrame(ACCENTED).to_csv(source, index=False, encoding="latin-1")
    expected = training_rows(source, "task.local.encoding=latin-1")
    assert expected == ACCENTED
    # the encoding is the run's task.local.encoding (here overridden on its config) ...
    assert predicted_rows(capsys, [str(trained), "--input", str(source), "task.local.encoding=latin-1"]) == expected
    # ... or --encoding's
    assert predicted_rows(capsys, [str(trained), "--input", str(source), "--encoding", "latin-1"]) == expected
    first = source.read_bytes().index("é".encode("latin-1"))
    err = one_line_error(capsys, predict_main, [str(trained), "--input", str(source)])  # the run's: utf-8
    assert f"{source}: byte {first} (0xe9) is not valid utf-8" in err and "--encoding=latin-1" in err


def test_a_tsv_whose_text_starts_with_a_quote_gives_at_predict_the_rows_training_reads(trained, tmp_path, capsys):
    source = tmp_path / "in.tsv"
    source.write_text('sentence\tlabel\n"quoted start\t1\nplain "middle" quote\t0\nNA\t1\n')
    expected = training_rows(source)
    assert expected == [{"sentence": '"quoted start', "label": 1}, {"sentence": 'plain "middle" quote', "label": 0},
                        {"sentence": "NA", "label": 1}]  # fmt: skip
    assert predicted_rows(capsys, [str(trained), "--input", str(source)]) == expected


def test_predict_reads_parquet_and_refuses_an_unknown_encoding(trained, tmp_path, capsys):
    source = tmp_path / "in.parquet"
    pd.DataFrame(ACCENTED).to_parquet(source)
    assert predicted_rows(capsys, [str(trained), "--input", str(source)]) == ACCENTED
    err = one_line_error(capsys, predict_main, [str(trained), "--input", str(source), "--encoding", "latin-9000"])
    assert "--encoding='latin-9000' is not an encoding Python knows" in err


RECORDS = {
    "config": ".hydra/config.yaml",
    "prompt_record": "checkpoints/best/prompt_config.json",
    "prompt": "checkpoints/best/prompt.safetensors",
    "summary": "summary.json",
}
DAMAGE = {
    "unparsable": lambda data: b'{"step": [: \x00 not: [this',
    "truncated": lambda data: data[: len(data) // 2],
    "cut_at_a_line": lambda data: b"".join(data.splitlines(keepends=True)[: data.count(b"\n") // 2]),
    "empty": lambda data: b"",
}
TOOLS = {
    "eval": (eval_main, lambda run, tmp: [str(run)]),
    "predict": (predict_main, lambda run, tmp: [str(run), "--input", str(tmp / "in.txt")]),
    "export": (export_main, lambda run, tmp: [str(run), str(tmp / "adapter")]),
}
FIX = {
    "config": "restore it from a copy",
    "prompt_record": "restore the folder from a copy, or train the run again",
    "prompt": "restore the folder from a copy, or train the run again",
}


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("record", RECORDS)
def test_a_damaged_record_is_one_line_naming_it_and_the_fix(trained, tmp_path, capsys, record, damage, tool):
    run_dir = copied(trained, tmp_path)
    path = run_dir / RECORDS[record]
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    (tmp_path / "in.txt").write_text("a gripping film\n")
    main, argv = TOOLS[tool]
    if record == "summary":  # no reuse reads it (the finished-run skip and ptlab-compare do): it works
        main(argv(run_dir, tmp_path))
        assert "ptlab: error" not in capsys.readouterr().err
        return
    err = one_line_error(capsys, main, argv(run_dir, tmp_path))
    assert err.startswith(f"ptlab: error: {path} ") and FIX[record] in err
    assert ("cannot be read (empty)" in err) == (damage == "empty")
    if record == "config" and damage == "cut_at_a_line":  # still YAML: what it lacks is named
        assert "lacks hardware.device" in err and "the file was cut short or edited" in err

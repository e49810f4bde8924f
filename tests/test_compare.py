"""ptlab-compare on a real (tiny) multirun: grouping, statistics against scipy, failed runs, figures,
and the rerun of a sweep skipping its finished jobs."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
from scipy import stats
from test_scale_out import QUICK, cli

from ptlab.cli.compare import main as compare_main
from ptlab.lab.run_record import find_runs

from conftest import SHARED_DATA

SWEEP = [*QUICK, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.log_every=1", "trainer.batch_size=8"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 methods x 3 seeds on SST-2, plus a job that fails (prompt length 0)."""
    root = tmp_path_factory.mktemp("compare")
    result = cli(
        ["-m", *SWEEP, "seed=0,1,2", "method=prompt_tuning,smop", f"hydra.sweep.dir={root / 'a'}"],
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    failed = cli(["-m", *SWEEP, "method.prompt_length=0", f"hydra.sweep.dir={root / 'b'}"], timeout=300)
    assert failed.returncode == 1
    return root


def best_scores(root, method):
    runs = [r for r in find_runs([root / "a"]) if r.summary["method"] == method]
    return {r.seed: r.summary["best"]["acc"] for r in runs}


def test_table_matches_an_independent_computation(sweep, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        compare_main(
            [str(sweep / "a"), "--baseline", "method=prompt_tuning", "--out", str(out), "--target", "0.0"]
        )
        == 0
    )
    rows = {
        row["method"]: row
        for row in csv.DictReader((out / "table.csv").open())
        if row["metric"] == "acc" and row["stat"] == "best"
    }
    assert set(rows) == {"prompt_tuning", "smop"}  # grouped by the swept key; seed is the sample
    pt, smop = best_scores(sweep, "prompt_tuning"), best_scores(sweep, "smop")
    assert sorted(pt) == [0, 1, 2]
    row = rows["smop"]
    assert int(row["n"]) == 3 and row["task"] == "sst2"
    assert float(row["mean"]) == pytest.approx(statistics.mean(smop.values()))
    assert float(row["std"]) == pytest.approx(statistics.stdev(smop.values()))
    half = stats.t.ppf(0.975, 2) * statistics.stdev(smop.values()) / math.sqrt(3)
    assert float(row["ci95"]) == pytest.approx(half)
    assert float(row["delta"]) == pytest.approx(statistics.mean(smop.values()) - statistics.mean(pt.values()))
    assert row["test"] == "paired"  # same seeds: paired over seeds
    differences = [smop[s] - pt[s] for s in (0, 1, 2)]
    if len(set(differences)) > 1:
        assert float(row["p"]) == pytest.approx(
            stats.ttest_rel([smop[s] for s in (0, 1, 2)], [pt[s] for s in (0, 1, 2)]).pvalue
        )
    summaries = [json.loads(p.read_text()) for p in (sweep / "a").glob("*/summary.json")]
    smop_params = {s["trainable_params"] for s in summaries if s["method"] == "smop"}
    assert float(row["trainable_params"]) == smop_params.pop()
    table = (out / "table.md").read_text()
    assert "Difference to **prompt_tuning**" in table and "steps to 0 |" in table
    assert (
        "Floor (one constant prediction: the majority class, the mean for regression): sst2 " in table
        and table == capsys.readouterr().out.split("written to")[0].rstrip("\n") + "\n"
    )
    for name in ("curves_sst2.png", "pareto_sst2.png", "router_sst2.png"):  # smop routes: its router figure
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_failed_runs_are_listed_with_their_error(sweep, tmp_path):
    out = tmp_path / "cmp"
    compare_main([str(sweep / "a"), str(sweep / "b"), "--out", str(out), "--no-plots"])
    table = (out / "table.md").read_text()
    assert "(failed): method.prompt_length=0 must be >= 1" in table
    assert not list(out.glob("*.png"))


def test_an_unknown_baseline_names_the_groups(sweep, tmp_path):
    with pytest.raises(SystemExit, match="matches no group .*prompt_tuning, smop"):
        compare_main([str(sweep / "a"), "--baseline", "method=residual", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no such folder"):
        compare_main([str(tmp_path / "nowhere")])


def test_rerunning_a_sweep_skips_its_finished_jobs(sweep, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in (sweep / "a").glob("*/metrics.jsonl")}
    result = cli(
        ["-m", *SWEEP, "seed=0,1,2", "method=prompt_tuning,smop", f"hydra.sweep.dir={sweep / 'a'}"],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (result.stdout + result.stderr).count("already finished") == 6
    assert before == {p: p.stat().st_mtime_ns for p in (sweep / "a").glob("*/metrics.jsonl")}


def test_best_of_names_each_groups_best_setting(sweep, tmp_path, capsys):
    """`--best-of`: the setting with the highest mean score (here: the better method)."""
    compare_main(
        [str(sweep / "a"), "--by", "method", "--best-of", "method", "--out", str(tmp_path), "--no-plots"]
    )
    table = capsys.readouterr().out
    means = {m: statistics.mean(best_scores(sweep, m).values()) for m in ("prompt_tuning", "smop")}
    winner, loser = sorted(means, key=lambda m: -means[m])
    assert "Best method per comparison" in table
    assert (
        f"| - | sst2 | method={winner} | {100 * means[winner]:.1f} | method={loser} {100 * means[loser]:.1f} |"
        in table
    )
    with pytest.raises(SystemExit, match="--best-of trainer.lr: not among the grouping keys"):
        compare_main([str(sweep / "a"), "--by", "method", "--best-of", "trainer.lr", "--out", str(tmp_path)])


def test_a_test_score_is_read_against_the_test_splits_floor(tmp_path, capsys):
    """With `data.split_protocol=smop` the validation is held-out training rows and the test is the
    official dev set: their majority classes differ (RTE: ~50 % and 146/277), and the table's floor
    is the one of the split its scores come from."""
    run = tmp_path / "run"
    steps = ["task=rte", "data.split_protocol=smop", "data.max_eval_examples=300", "trainer.max_steps=1"]
    result = cli([*QUICK, *steps, "trainer.eval_every=1", f"hydra.run.dir={run}"], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    with (SHARED_DATA / "glue" / "rte" / "dev.tsv").open() as dev:
        labels = [row["label"] for row in csv.DictReader(dev, delimiter="\t", quoting=csv.QUOTE_NONE)]
    summary = json.loads((run / "summary.json").read_text())
    test_floor = max(labels.count(label) for label in set(labels)) / len(labels)
    assert summary["test_baseline"]["acc"] == pytest.approx(test_floor)
    assert abs(summary["baseline"]["acc"] - test_floor) > 0.01
    for stat, floor in (("auto", test_floor), ("test", test_floor), ("best", summary["baseline"]["acc"])):
        compare_main([str(run), "--stat", stat, "--out", str(tmp_path / stat), "--no-plots"])
        assert f"Floor (one constant prediction: the majority class, the mean for regression): rte {100 * floor:.1f}." in capsys.readouterr().out

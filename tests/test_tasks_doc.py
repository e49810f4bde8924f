"""docs/tasks.md's worked example, run as written: its task YAML (read from the doc) kept outside
the repository, one CSV file with no validation split, no label_map, trained to a saved prompt."""

from __future__ import annotations

import csv
import json
import re

from test_scale_out import QUICK, cli

from conftest import REPO

DOC = (REPO / "docs" / "tasks.md").read_text()


def doc_block(language: str, first_line: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", DOC, flags=re.S)
    (block,) = [block for block in blocks if block.startswith(first_line)]
    return block


def test_the_worked_example_trains_a_prompt_from_a_raw_csv(tmp_path):
    header = doc_block("csv", "headline,topic").splitlines()[0].split(",")
    with open(tmp_path / "headlines.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for i in range(300):
            topic = ["sport", "weather", "politics"][i % 3]
            writer.writerow([f"{topic} news, item {i}: a headline with a comma", topic])
    (tmp_path / "my_conf" / "task").mkdir(parents=True)
    (tmp_path / "my_conf" / "task" / "topics.yaml").write_text(
        doc_block("yaml", "# my_conf/task/topics.yaml")
    )
    assert "ptlab-train --config-dir my_conf task=topics\n" in DOC
    run_dir = tmp_path / "run"
    overrides = [*QUICK, "trainer.max_steps=4", "trainer.eval_every=4", f"hydra.run.dir={run_dir}"]
    result = cli(["--config-dir", "my_conf", "task=topics", *overrides], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "task topics: no validation file; held out 30 of the 300 rows of" in result.stdout
    assert "majority class 0.3333" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["task"] == "topics"
    assert set(summary["best"]) >= {"acc", "macro_f1"}
    assert (run_dir / "checkpoints" / "best" / "prompt.safetensors").exists()

"""Every method composes with every backbone family and task, trains, checkpoints and resumes."""

from __future__ import annotations

import json

import pytest

from ptlab.config.schema import to_object
from ptlab.training.job import run

from conftest import METHOD_ALIASES, TINY, compose_config, group_values

METHODS = group_values("method")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("task", group_values("task"))
def test_method_composes_with_every_task(method, task):
    config = to_object(compose_config([f"method={method}", f"task={task}"]))
    assert config.method.name == METHOD_ALIASES.get(method, method) and config.task.name == task
    assert config.method.run_label == method  # runs are logged under the YAML's name (pt100, fpt)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backbone", ["tiny_t5", "tiny_llama", "tiny_bert"])
def test_method_trains_on_every_family(tmp_path, method, backbone):
    overrides = [
        *TINY,
        f"method={method}",
        f"backbone={backbone}",
        "trainer.max_steps=4",
        "trainer.eval_every=2",
        "trainer.batch_size=8",
    ]
    score = run(compose_config(overrides), run_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4 and 0.0 <= score <= 1.0
    assert (tmp_path / "checkpoints/best/export.safetensors").exists()
    validation = [
        json.loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if '"validation"' in line
    ]
    if method == "smop":  # router statistics land with every evaluation
        assert all("router_entropy" in event and "router_prompt0_fraction" in event for event in validation)
    run(compose_config([*overrides, "trainer.max_steps=6", "trainer.resume=true"]), run_dir=tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 6

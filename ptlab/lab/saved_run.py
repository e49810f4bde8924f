"""A run folder, or a trained prompt's folder alone (`checkpoints/best`, copied anywhere), turned
back into its pipeline with the prompt loaded: what `ptlab-eval`, `ptlab-predict` and `ptlab-export`
stand on.

The config is the run's own composed config (`.hydra/config.yaml` of a run folder; the prompt
record's copy in a prompt folder) on today's schemas, with the caller's overrides on top (e.g.
`backbone.path=...` or `data.dir=...` on another machine): the model, the template, the
verbalizers and the source length are those the run had, whatever conf/ or ptlab's defaults say
now (ptlab/config/saved.py). The prompt's record is checked against the result before the prompt
is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import yaml

from ptlab.config.saved import load_saved_config, tell
from ptlab.config.schema import Config
from ptlab.errors import ConfigError
from ptlab.training import checkpoint
from ptlab.training.build import Pipeline, build
from ptlab.training.run_folder import read_json_record


def saved_config(path: Path, overrides: Sequence[str] = (), say: Callable[[str], None] = tell) -> Config:
    """The config a run folder's or a prompt folder's prompt was trained with, `overrides` on top."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such run or prompt folder")
    composed = path / ".hydra" / "config.yaml"
    if composed.is_file():
        return load_saved_config(yaml.safe_load(composed.read_text()), str(composed), overrides, say)
    record = read_json_record(path / "prompt_config.json")
    if record is not None and "config" in record:
        return load_saved_config(record["config"], str(path / "prompt_config.json"), overrides, say)
    raise ConfigError(f"{path} has neither .hydra/config.yaml (a run folder) nor a prompt_config.json with the "
                      "run's config (checkpoints/best): give a folder that ptlab-train wrote")  # fmt: skip


def check_prompt_fits(
    record: Dict[str, Any], pipeline: Pipeline, source: Path, allow_other_weights: bool = False
) -> None:
    """The prompt must come from this method and backbone, and the backbone's weights and tokenizer
    must be those it was trained on (unless `allow_other_weights`); the task may differ when its
    verbalizers are the same (evaluating a prompt on a related task)."""
    mine = pipeline.prompt_config()
    keys = [key for key in checkpoint.PROMPT_KEYS if not (allow_other_weights and key == "fingerprint")]
    key = checkpoint.record_difference(record, mine, keys)
    if key == "fingerprint":
        raise ConfigError(
            f"the prompt in {source} was trained on backbone weights and tokenizer {record[key]}; "
            f"backbone.path={pipeline.config.backbone.path!r} gives {mine[key]} (other weights behind the "
            "same name or path): point backbone.path at the weights it was trained on, or pass "
            "--allow-other-weights if this is meant"
        )
    if key == "verbalizers":
        raise ConfigError(
            f"the prompt in {source} scores the verbalizers {record[key]}; task "
            f"{pipeline.config.task.name!r} has {mine[key]}: use a task with the same ones"
        )
    if key is not None:
        raise ConfigError(
            f"the prompt in {source} was trained with {key}={record[key]!r}; this config has "
            f"{mine[key]!r}: the conf/ files changed since the run, or an override changed it"
        )


def load_run(
    run_dir: Path,
    overrides: Sequence[str] = (),
    splits: Optional[Sequence[str]] = None,
    config: Optional[Config] = None,
    allow_other_weights: bool = False,
) -> Pipeline:
    """The run's pipeline (the given `splits` tokenized; none: no data) with its best prompt loaded;
    `config`: the run's config when the caller has composed it already (`saved_config`)."""
    run_dir = Path(run_dir)
    config = config or saved_config(run_dir, overrides)
    tensors, record = checkpoint.saved_prompt(run_dir)  # before the model loads: a missing prompt fails fast
    pipeline = build(config, splits=splits)
    check_prompt_fits(record, pipeline, checkpoint.best_prompt_dir(run_dir), allow_other_weights)
    checkpoint.load_trainable(pipeline.method, pipeline.readout, tensors)
    pipeline.backbone.eval()
    pipeline.method.eval()
    return pipeline

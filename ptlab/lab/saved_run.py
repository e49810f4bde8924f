"""A run folder, or a trained prompt's folder alone (`checkpoints/best`, copied anywhere), turned
back into its pipeline with the prompt loaded: what `ptlab-eval`, `ptlab-predict` and `ptlab-export`
stand on.

The config is the run's own composed config (`.hydra/config.yaml` of a run folder; the prompt
record's copy in a prompt folder) on today's schemas, with the caller's overrides on top (e.g.
`backbone.path=...` or `data.dir=...` on another machine): the model, the template, the
verbalizers and the source length are those the run had, whatever conf/ or ptlab's defaults say
now (ptlab/config/saved.py). The prompt's record is checked against the result before the prompt
is loaded. Several folders over the same backbone (`load_runs`) share one loaded backbone, so their
prompts can be scored together, several runs' rows in one pass per batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml

from ptlab.config.difference import config_difference
from ptlab.config.saved import load_saved_config, tell
from ptlab.config.schema import Config
from ptlab.errors import ConfigError
from ptlab.training import checkpoint
from ptlab.training.build import Pipeline, SharedBackbone, build, frozen_backbone, shared_settings
from ptlab.training.run_folder import read_record


def saved_config(path: Path, overrides: Sequence[str] = (), say: Callable[[str], None] = tell) -> Config:
    """The config a run folder's or a prompt folder's prompt was trained with, `overrides` on top."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such run or prompt folder")
    composed = path / ".hydra" / "config.yaml"
    if composed.is_file():
        fix = ("the run's composed config is damaged: restore it from a copy, or give the run's "
               "checkpoints/best folder (its prompt_config.json holds the same config)")  # fmt: skip
        saved = read_record(composed, lambda file: yaml.safe_load(file.read_text(encoding="utf-8")), fix)
        return load_saved_config(saved, str(composed), overrides, say)
    if (path / "prompt_config.json").is_file():
        record = checkpoint.read_prompt_record(path / "prompt_config.json")
        if "config" in record:
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
    shared: Optional[SharedBackbone] = None,
) -> Pipeline:
    """The run's pipeline (the given `splits` tokenized; none: no data) with its best prompt loaded;
    `config`: the run's config when the caller has composed it already (`saved_config`); `shared`:
    a backbone already loaded for the same `config.backbone` (several folders scored together),
    else the run's own is loaded."""
    run_dir = Path(run_dir)
    config = config or saved_config(run_dir, overrides)
    tensors, record = checkpoint.saved_prompt(run_dir)  # before the model loads: a missing prompt fails fast
    pipeline = build(config, splits=splits, shared=shared)
    check_prompt_fits(record, pipeline, checkpoint.best_prompt_dir(run_dir), allow_other_weights)
    checkpoint.load_trainable(pipeline.method, pipeline.readout, tensors)
    pipeline.backbone.eval()
    pipeline.method.eval()
    return pipeline


def check_one_backbone(run_dirs: Sequence[Path], configs: Sequence[Config]) -> None:
    """Every folder's backbone setup (`shared_settings`: what a pack's members share too) is the first
    folder's: one loaded backbone serves them all."""
    first = shared_settings(configs[0])
    for run_dir, config in zip(run_dirs[1:], configs[1:]):
        difference = config_difference(first, shared_settings(config), ignore=())
        if difference is not None:
            raise ConfigError(
                f"{run_dir} differs from {run_dirs[0]} in {difference}: the folders scored together share "
                "one loaded backbone, so their backbone and hardware settings must be the same; score "
                "them in separate commands"
            )


def load_runs(
    run_dirs: Sequence[Path],
    overrides: Sequence[str] = (),
    splits: Optional[Sequence[str]] = None,
    allow_other_weights: bool = False,
    configs: Optional[Sequence[Config]] = None,
) -> List[Pipeline]:
    """Several folders' pipelines (as `load_run`; one folder: exactly `load_run`) on one backbone,
    loaded once from the first folder's config; `overrides` go on each folder's config (`configs`:
    composed already). Every config is read, the backbones compared and the prompts found before
    the model loads."""
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    configs = list(configs or [saved_config(run_dir, overrides) for run_dir in run_dirs])
    check_one_backbone(run_dirs, configs)
    for run_dir in run_dirs:
        checkpoint.best_prompt_dir(run_dir)  # a missing prompt fails before the model loads
    shared = frozen_backbone(configs[0]) if len(run_dirs) > 1 else None
    return [
        load_run(
            run_dir, splits=splits, config=config, allow_other_weights=allow_other_weights, shared=shared
        )
        for run_dir, config in zip(run_dirs, configs)
    ]

"""A run folder turned back into its pipeline with its best prompt loaded: what `ptlab-eval`,
`ptlab-predict`, `ptlab-export` and `method.init_from` stand on.

The config is composed again from the folder's `.hydra/overrides.yaml` (plus the caller's
overrides, e.g. `backbone.path=...` or `data.dir=...` on another machine), so the model, the
template and the verbalizers are exactly those of the run; the prompt's own record
(`checkpoints/best/prompt_config.json`) is checked against the result before anything is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ptlab.config.compose import compose
from ptlab.config.schema import Config, to_object
from ptlab.errors import ConfigError
from ptlab.training import checkpoint
from ptlab.training.build import Pipeline, build

# what a re-evaluation must not inherit from the run: where it wrote, and whether it resumed
DROPPED = ("hydra.", "trainer.resume")


def saved_overrides(run_dir: Path) -> List[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder")
    if not path.exists():
        raise ConfigError(f"{run_dir} has no .hydra/overrides.yaml: give a folder that ptlab-train wrote")
    items = yaml.safe_load(path.read_text()) or []
    return [str(item) for item in items if not str(item).lstrip("+~").startswith(DROPPED)]


def saved_config(run_dir: Path, overrides: Sequence[str] = ()) -> Config:
    """The run's config, with `overrides` applied on top (later wins)."""
    return to_object(compose([*saved_overrides(run_dir), *overrides]))


def check_prompt_fits(record: Dict[str, Any], pipeline: Pipeline, source: Path) -> None:
    """The prompt must come from this method and backbone; the task may differ when its verbalizers
    are the same (evaluating a prompt on a related task)."""
    mine = pipeline.prompt_config()
    for key in ("method", "backbone", "hidden_size"):
        if checkpoint.prompt_identity(record.get(key)) != checkpoint.prompt_identity(mine.get(key)):
            raise ConfigError(
                f"the prompt in {source} was trained with {key}={record.get(key)!r}; this config has "
                f"{mine.get(key)!r}: the conf/ files changed since the run, or an override changed it"
            )
    if record.get("verbalizers") != mine.get("verbalizers"):
        raise ConfigError(
            f"the prompt in {source} scores the verbalizers {record.get('verbalizers')}; task "
            f"{pipeline.config.task.name!r} has {mine.get('verbalizers')}: use a task with the same ones"
        )


def load_run(
    run_dir: Path,
    overrides: Sequence[str] = (),
    splits: Optional[Sequence[str]] = None,
    config: Optional[Config] = None,
) -> Pipeline:
    """The run's pipeline (the given `splits` tokenized; none: no data) with its best prompt loaded;
    `config`: the run's config when the caller has composed it already (`saved_config`)."""
    run_dir = Path(run_dir)
    config = config or saved_config(run_dir, overrides)
    tensors, record = checkpoint.saved_prompt(run_dir)  # before the model loads: a missing prompt fails fast
    pipeline = build(config, splits=splits)
    check_prompt_fits(record, pipeline, checkpoint.best_prompt_dir(run_dir))
    checkpoint.load_trainable(pipeline.method, pipeline.readout, tensors)
    pipeline.backbone.eval()
    pipeline.method.eval()
    return pipeline

"""A run's own composed config read back, so that reusing a run (ptlab-eval, -predict, -export,
method.init_from) scores it exactly as it ran, whatever has changed in conf/ or in ptlab's defaults
since: the saved config is validated by today's schemas (under today's node names,
config/renamed.py), and command-line overrides go on top.

A key added to a schema since the run was written takes its default (said once); a key the run has
and today's schemas do not is one line naming it. Overrides are `ptlab-train`'s: `key=value` for a
setting, `group=option` to swap a whole group's node (`task=rte_glue`, `hardware=gpu`).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, List, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ptlab.config.compose import compose, one_line
from ptlab.config.difference import leaves
from ptlab.config.renamed import check_override_names, with_todays_names
from ptlab.config.schema import Config, to_object
from ptlab.errors import ConfigError

# the groups whose option is a node of the same name; recipe, optim and experiment set several
# nodes at once (what was trained), so they are not overrides of a run's config
NODE_GROUPS = ("method", "backbone", "task", "hardware", "logger", "stages")
# what a reuse never inherits: whether the run resumed
DROPPED = ("trainer.resume",)


def tell(line: str) -> None:
    """Notes on a reused config go to stderr: stdout may be the predictions."""
    print(f"ptlab: {line}", file=sys.stderr)


def on_todays_schemas(saved: DictConfig, source: str, say: Callable[[str], None]) -> DictConfig:
    """The saved config merged onto the schemas (the method's by its name)."""
    from ptlab.methods import registered_methods

    methods = registered_methods()
    name = OmegaConf.select(saved, "method.name")
    if name not in methods:
        raise ConfigError(
            f"{source}: method {name!r} is not a method of this ptlab (it has: {', '.join(sorted(methods))})"
        )
    rest = OmegaConf.masked_copy(saved, [key for key in saved if key != "method"])
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), rest)
        merged.method = OmegaConf.merge(OmegaConf.structured(methods[name].config), saved.method)
    except ConfigKeyError as error:
        raise ConfigError(
            f"{source}: {error.full_key} is not a setting of this ptlab (removed or renamed since the run): "
            "reuse the run with the ptlab version that wrote it, or delete the key from that file"
        ) from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {one_line(error)}") from None
    missing = sorted(OmegaConf.missing_keys(merged))  # settings without a default: every run's config has them
    if missing:
        raise ConfigError(f"{source} lacks {', '.join(missing)}, which every run's config holds (the file "
                          "was cut short or edited): restore it from a copy")  # fmt: skip
    added = sorted(set(leaves(OmegaConf.to_container(merged))) - set(leaves(OmegaConf.to_container(saved))))
    if added:
        say(
            f"{source} was written by an older ptlab; these settings take today's defaults: {', '.join(added)}"
        )
    return merged


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], say: Callable[[str], None]) -> None:
    """`ptlab-train` overrides on top of a saved config; each change is said."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    check_override_names(overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as error:
        raise ConfigError(one_line(error)) from None
    changed: List[str] = []
    for override in parsed:
        key, value = override.key_or_group, override.value()
        if override.is_sweep_override() or override.is_delete():
            raise ConfigError(f"{override.input_line!r}: give one value (KEY=VALUE) to reuse a run with")
        if key in ("recipe", "optim", "experiment"):
            raise ConfigError(f"{override.input_line!r}: a {key} changes what was trained, not how a trained "
                              "prompt is reused: override single settings instead")  # fmt: skip
        before = OmegaConf.select(cfg, key, default=None)
        if key in NODE_GROUPS and isinstance(value, str):
            cfg[key] = compose([f"{key}={value}"])[key]
            changed.append(f"{key}={value} (the group's file of today's conf/)")
            continue
        try:
            OmegaConf.update(
                cfg, key, value, merge=False, force_add=override.is_add() or override.is_force_add()
            )
        except OmegaConfBaseException as error:
            raise ConfigError(f"{override.input_line!r}: {one_line(error)}") from None
        changed.append(f"{key}: {before!r} -> {value!r}")
    if changed:
        say("overridden on the run's config: " + "; ".join(changed))


def load_saved_config(
    saved: Any, source: str, overrides: Sequence[str] = (), say: Callable[[str], None] = tell
) -> Config:
    """A run's composed config (a DictConfig or plain dict, as `.hydra/config.yaml` or a prompt
    record holds it) on today's schemas with `overrides` on top, validated."""
    plain = OmegaConf.to_container(saved) if isinstance(saved, DictConfig) else saved
    node = OmegaConf.create(with_todays_names(plain))
    for key in DROPPED:
        if OmegaConf.select(node, key, default=None) is not None:
            OmegaConf.update(node, key, False)
    cfg = on_todays_schemas(node, source, say)
    apply_overrides(cfg, overrides, say)
    return to_object(cfg)

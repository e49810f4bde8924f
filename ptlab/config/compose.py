"""Where ptlab's config tree is, and the one way to compose it outside `ptlab-train`.

The tree is `conf/` at the top of the repository; a wheel carries it inside the package as
`ptlab/conf` (the package `ptlab.conf`, so `pkg://ptlab.conf` names it on a Hydra search path).
Hydra's own multi-line errors are folded into ptlab's one line here too.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig

from ptlab.config.renamed import check_override_names, with_pointer

_PACKAGE_CONF = Path(__file__).resolve().parent.parent / "conf"  # an installed wheel
_CHECKOUT_CONF = Path(__file__).resolve().parents[2] / "conf"  # a checkout (editable install)
CONF: Path = _PACKAGE_CONF if _PACKAGE_CONF.is_dir() else _CHECKOUT_CONF
CONF_DIR = str(CONF)

# lines of Hydra's reports that name internals, not the mistake
NOISE = (
    "full_key:",
    "object_type=",
    "Config search path",
    "provider=",
    "reference_type=",
    "To append to your config",
)


def one_line(error: Optional[BaseException]) -> str:
    """Hydra's multi-line message and its causes (an unknown group value with its options, a
    misspelled key with the closest setting and them all, a value of the wrong type) folded into
    one line, search paths left out, and an old group name pointed to its new one."""
    from ptlab.config.schema import unknown_key_hint

    parts = []
    while error is not None:
        for line in str(error).splitlines():
            line = line.strip()
            if not line or line.startswith(NOISE) or line in parts:
                continue
            parts.append(line)
        schema, key = getattr(error, "object_type", None), getattr(error, "key", None)
        if "not in" in str(error) and dataclasses.is_dataclass(schema) and isinstance(key, str):  # a misspelled key
            full_key = str(getattr(error, "full_key", "") or key)
            parts.append(f"({unknown_key_hint(schema, key, full_key[: len(full_key) - len(key)])})")
        error = error.__cause__
    return with_pointer(" ".join(parts).replace(" Available options in", "; available in"))


def run_stamp() -> str:
    """The run folder's name: the time to the microsecond (no two launches collide), or, for the
    ranks of one torchrun launch, one name they all derive alike (their launcher's run id and pid)."""
    from ptlab.ranks import launched_ranks

    if launched_ranks().size > 1:
        return f"ddp/{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}-{os.getppid()}"
    return datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")


def register_schemas() -> None:
    """What conf/ names besides its own files: the schemas (`- /schema_task@_here_`) and the run
    folder's resolver (`${ptlab_stamp:}`); done before any composition."""
    from omegaconf import OmegaConf

    from ptlab.config.schema import register_configs

    register_configs()
    OmegaConf.register_new_resolver("ptlab_stamp", run_stamp, use_cache=True, replace=True)


def compose(
    overrides: Sequence[str] = (), with_hydra: bool = False, config_dirs: Sequence[str] = ()
) -> DictConfig:
    """The config `ptlab-train` composes for these command-line overrides (not yet validated by
    the schemas: `to_object` does that). `with_hydra` keeps the `hydra` node, for code that reads
    its runtime facts; `config_dirs` are further folders on the search path (a user's `--config-dir`).
    Hydra's errors, and an old group name (config/renamed.py), become a one-line `ConfigError`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ptlab.errors import ConfigError

    check_override_names(overrides)
    register_schemas()
    searchpath = [f"hydra.searchpath=[{','.join('file://' + str(Path(d).resolve()) for d in config_dirs)}]"]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose(
                "config",
                overrides=[*(searchpath if config_dirs else []), *overrides],
                return_hydra_config=with_hydra,
            )
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(one_line(error)) from None
    finally:
        GlobalHydra.instance().clear()

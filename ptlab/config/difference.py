"""Where two configs differ, setting by setting: what stops a resume (or a finished-run skip) whose
config is not its checkpoint's, and what keeps two jobs out of one pack."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from ptlab.config.renamed import with_todays_names

# settings a resumed (or skipped) run may change: where it reads and writes, what it logs to, the
# machine it runs on, how far it trains; any other setting that differs from its checkpoint's stops it
MAY_CHANGE_ON_RESUME = (
    "trainer.resume", "trainer.max_steps", "trainer.epochs", "trainer.log_every", "trainer.eval_batch_size",
    "trainer.compile", "trainer.lock_timeout_s", "logger.", "hardware.", "data.dir", "backbone.path",
    "method.label", "method.init_from",
)  # fmt: skip



def leaves(node: Any, prefix: str = "") -> Dict[str, Any]:
    """A nested dict as `{dotted.key: value}`."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in leaves(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def config_difference(
    saved: Optional[Dict[str, Any]], current: Dict[str, Any], ignore: Sequence[str] = MAY_CHANGE_ON_RESUME
) -> Optional[str]:
    """The first setting (`key: saved -> current`) in which a run's config differs from the config
    its checkpoint was trained with, the settings a resume may change (`ignore`'s key prefixes)
    aside; None when the same (or when the checkpoint, older than the record of its config, cannot
    say)."""
    if saved is None:
        return None
    before, after = leaves(with_todays_names(saved)), leaves(current)
    for key in sorted(before.keys() | after.keys()):
        if key.startswith(tuple(ignore)):
            continue
        if before.get(key, "(not set)") != after.get(key, "(not set)"):
            return f"{key}: {before.get(key, '(not set)')!r} -> {after.get(key, '(not set)')!r}"
    return None

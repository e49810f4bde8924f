"""Which code ran: ptlab's version and, from a git checkout, its commit and whether the working tree
had changes, recorded in every run folder (summary.json, the prompt records) as W&B records it."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional

from ptlab.version import __version__


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_version() -> Dict[str, Any]:
    """`{"ptlab": version, "commit": sha or None, "dirty": bool or None}`; the commit is that of the
    checkout ptlab was imported from (an editable install), None for an installed wheel."""
    top = _git("rev-parse", "--show-toplevel")
    inside = (
        top is not None
        and (Path(top) / "ptlab" / "__init__.py").resolve() == Path(__file__).resolve().parent / "__init__.py"
    )
    if not inside:
        return {"ptlab": __version__, "commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "ptlab": __version__,
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
    }

"""ptlab: a Hydra-configured lab for soft-prompt tuning of frozen language models.

`ptlab.build(config)` assembles the pipeline a run trains with (ptlab/training/build.py); it is
imported on first use, so `import ptlab` stays cheap.
"""

from typing import Any

from ptlab.version import __version__ as __version__

__all__ = ["Pipeline", "build"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ptlab.training import build as pipeline_module

        return getattr(pipeline_module, name)
    raise AttributeError(f"module 'ptlab' has no attribute {name!r}")

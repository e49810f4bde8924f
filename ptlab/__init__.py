"""ptlab: a Hydra-configured lab for soft-prompt tuning of frozen language models."""

__version__ = "0.1.0"

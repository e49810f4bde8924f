"""The command line: `ptlab-train` (Hydra's app and its light entry point) and the commands that reuse a run folder (`ptlab-eval`, `ptlab-predict`, `ptlab-export`)."""

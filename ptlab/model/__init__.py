"""The frozen model: loading, the families' rules for placing a prompt, per-layer prefixes, FPT's partial models, layouts and FLOPs."""

"""One run: its pipeline built from config, the training loop, evaluation, checkpoints, metrics, and its run folder."""

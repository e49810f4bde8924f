"""Task rows: local files or the hub, templates and verbalizers, tokenized splits (cached on disk), batches, and the tasks' metrics."""

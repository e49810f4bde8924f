"""The measurements of scripts/bench.py, one module each, and what they share."""

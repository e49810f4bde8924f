"""Side-by-side comparisons on real data with a real offline backbone, 3 seeds: each preset is an
experiment (conf/experiment/) run as one Hydra multirun, then summarised by `ptlab-compare`.

    python scripts/compare.py methods   # experiment=minilm_methods: PT vs SMoP vs SuperPos (dropout on/off) vs Residual
    python scripts/compare.py fpt       # experiment=minilm_fpt: constant schedule vs FPT-LD / FR / CR
    python scripts/compare.py smollm2   # experiment=smollm2_methods: every method text-to-text on SmolLM2 (~2 h)
    python scripts/compare.py methods --write-docs trainer.max_steps=300   # overrides go to every run

Runs land in outputs/compare/<preset>/ (run it again to continue: finished jobs are skipped, a cut job
resumes); the table and plots in outputs/compare/<preset>/compare/, or in docs/results/<preset>/ with
--write-docs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ptlab.cli.compare import main as compare_main

REPO = Path(__file__).resolve().parent.parent

# preset -> (experiment, the group the others are tested against, steps-to-score target)
PRESETS = {
    "methods": ("minilm_methods", "recipe=pt20", 0.75),
    "fpt": ("minilm_fpt", "stages=constant", 0.75),
    "smollm2": ("smollm2_methods", "recipe=pt20", 0.7),
}


def relative(path: Path) -> str:
    """A path as the docs should show it: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("overrides", nargs="*", help="ptlab-train overrides for every run")
    parser.add_argument("--runs-dir", type=Path, help="default: outputs/compare/<preset>")
    parser.add_argument(
        "--write-docs", action="store_true", help="write the table and plots to docs/results/<preset>/"
    )
    args = parser.parse_intermixed_args()  # overrides may follow the options
    experiment, baseline, target = PRESETS[args.preset]
    sweep = args.runs_dir or REPO / "outputs" / "compare" / args.preset
    command = [sys.executable, "-m", "ptlab.cli.train", "-m", f"experiment={experiment}", "logger=none",
               f"hydra.sweep.dir={sweep}", *args.overrides]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    launched = subprocess.run(command, cwd=REPO, env=env)
    os.chdir(REPO)  # a failed job: listed by ptlab-compare below
    out = REPO / "docs" / "results" / args.preset if args.write_docs else sweep / "compare"
    made_by = "python scripts/compare.py " + " ".join(sys.argv[1:])
    compare_main([relative(sweep), "--baseline", baseline, "--target", str(target), "--out", relative(out),
                  "--note", f"Made by `{made_by}` (the sweep `experiment={experiment}`, then this table)."])  # fmt: skip
    return launched.returncode


if __name__ == "__main__":
    sys.exit(main())

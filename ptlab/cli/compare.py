"""`ptlab-compare`: turn run folders (a sweep, several sweeps, single runs) into one comparison.

    ptlab-compare outputs/multirun/2026-11-26/10-00-00 --baseline method=prompt_tuning
    ptlab-compare SWEEP_A SWEEP_B --by method method.prompt_length --out docs/results/mine
    ptlab-compare LR_GRID --by recipe trainer.lr --best-of trainer.lr    # each recipe's best lr

Runs are grouped by the settings that vary between them (their command-line overrides, seed and
task aside; `--by` names them instead), tasks become columns, seeds become the sample. Writes
table.md and table.csv (mean, std, 95% confidence interval, difference to the baseline with a paired
t-test over shared seeds or Welch's otherwise, costs) and PNG figures: learning curves against steps,
training seconds and FLOPs; accuracy against cost (Pareto); SMoP's router use. Failed and
unfinished runs are listed, never silently dropped.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ptlab.config.renamed import check_override_names
from ptlab.errors import ConfigError
from ptlab.lab.comparison import Comparison
from ptlab.lab.comparison_tables import markdown, natural_key, varying_keys, write_csv
from ptlab.lab.run_record import find_runs


def expand(paths: Sequence[Path]) -> List[Path]:
    """Glob patterns (quoted on the command line) become the folders they match."""
    found: List[Path] = []
    for path in paths:
        text = str(path)
        if any(c in text for c in "*?["):
            anchor = Path("/") if text.startswith("/") else Path(".")
            matches = sorted(anchor.glob(text.lstrip("/")))
            if not matches:
                raise FileNotFoundError(f"{text}: matches no folder")
            found += matches
        else:
            found.append(path)
    return found


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ptlab-compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="RUN_OR_SWEEP_DIR")
    parser.add_argument(
        "--by", nargs="+", metavar="KEY", help="group by these settings (default: those that vary)"
    )
    parser.add_argument("--baseline", metavar="KEY=VALUE", help="the group the others are tested against")
    parser.add_argument("--metric", help="default: each task's main metric")
    parser.add_argument("--stat", choices=("auto", "best", "final", "test"), default="auto",
                        help="auto: the test split when the runs have one, else the best validation score")  # fmt: skip
    parser.add_argument("--target", type=float, help="also report steps to reach this score (e.g. 0.8)")
    parser.add_argument("--out", type=Path, help="output folder (default: <first path>/compare)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument(
        "--best-of", nargs="+", default=[], metavar="KEY",
        help="also name each group's best setting of these --by keys (e.g. trainer.lr per method)",
    )  # fmt: skip
    parser.add_argument(
        "--note", default="", help="a sentence printed under the command (how the runs were made)"
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        runs = sorted(find_runs(expand(args.paths)), key=lambda r: natural_key(r.path))
    except FileNotFoundError as error:
        raise SystemExit(f"ptlab-compare: {error}") from None
    if not runs:
        raise SystemExit(f"ptlab-compare: no run folders under {' '.join(map(str, args.paths))}")
    by = [key for item in args.by or [] for key in item.split(",") if key]
    try:
        check_override_names([*by, *([args.baseline] if args.baseline else [])])
    except ConfigError as error:
        raise SystemExit(f"ptlab-compare: {error}") from None
    by = by or varying_keys(runs) or ["method"]
    comp = Comparison(runs, by, args.metric, args.stat)
    baseline = comp.find_group(args.baseline) if args.baseline else None
    out = args.out or args.paths[0] / "compare"
    out.mkdir(parents=True, exist_ok=True)
    figures: List[str] = []
    if not args.no_plots:
        from ptlab.lab.plots import write_figures

        figures = write_figures(comp, out)
    given = list(sys.argv[1:] if argv is None else argv)
    if "--note" in given:  # the note is printed as itself, not as part of the command
        at = given.index("--note")
        del given[at : at + 2]
    command = "ptlab-compare " + " ".join(shlex.quote(a) for a in given)
    text = markdown(comp, baseline, args.target, command, figures, args.note, args.best_of)
    (out / "table.md").write_text(text)
    write_csv(comp, baseline, out / "table.csv")
    print(text)
    print(f"written to {out}/ (table.md, table.csv{', ' + ', '.join(figures) if figures else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

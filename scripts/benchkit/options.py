"""bench.py's command line, one small group of options per measurement, with --quick's defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchkit.backbones import BACKBONES, PACK_BACKBONES

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("fixed", "grouping", "eval", "tta", "packed")
DEFAULT_SECTIONS = ("fixed", "grouping", "eval", "tta")


def add_shared_options(parser: argparse.ArgumentParser) -> None:
    """What every section reads: the device, the fixed shapes and backbones, repeats, --quick, --out."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--backbones",
        nargs="+",
        choices=sorted(BACKBONES),
        help="default: t5_base_shape smollm2_135m (--quick: t5_base_shape)",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 repeats, one backbone, small real-data parts, no time to accuracy; "
        "packed sweeps on tiny_t5, K = 1 2, 4 steps",
    )
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench")


def add_section_options(parser: argparse.ArgumentParser) -> None:
    """The options of the tta, eval, fixed (--compile) and grouping sections, in --help's order."""
    parser.add_argument("--tta-target", type=float, default=0.78, help="time-to-accuracy target (0: skip)")
    parser.add_argument("--tta-max-steps", type=int, default=300)
    parser.add_argument("--tta-eval-every", type=int, default=25)
    parser.add_argument("--eval-examples", type=int, default=500)
    parser.add_argument(
        "--real-eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SmolLM2 on real SST-2 validation",
    )
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="time trainer.compile=true too"
    )
    parser.add_argument("--tta-peft-lrs", type=float, nargs="+", default=[3e-2, 3e-3])
    parser.add_argument(
        "--grouping-batches", type=int, default=30, help="real SST-2 batches per side (0: skip)"
    )


def add_sections_option(parser: argparse.ArgumentParser) -> None:
    """--sections: which measurements run."""
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(DEFAULT_SECTIONS),
        help="what to run: fixed (the fixed-shape comparisons on --backbones), grouping, eval (real "
        "SST-2 evaluation), tta (time to accuracy, CPU), packed (packed sweeps; not in the default: "
        f"{' '.join(DEFAULT_SECTIONS)})",
    )


def add_packed_options(parser: argparse.ArgumentParser) -> None:
    """The packed-sweep section's own group; left unset, `fill_defaults` fills them in."""
    packed = parser.add_argument_group("packed sweeps (--sections packed)")
    packed.add_argument(
        "--pack-backbones",
        nargs="+",
        choices=sorted(PACK_BACKBONES),
        help="default: minilm_l6 smollm2_135m (--quick: tiny_t5)",
    )
    packed.add_argument(
        "--pack-sizes",
        type=int,
        nargs="+",
        help="K, runs per sweep and pack; default: 1 2 4 8 (--quick: 1 2)",
    )
    packed.add_argument(
        "--pack-steps", type=int, help="trainer.max_steps of every run; default 30 (--quick: 4)"
    )
    packed.add_argument(
        "--pack-batch",
        type=int,
        help="one more row, the largest K at this realistic batch size (the other rows: --batch); "
        "default: the config's trainer.batch_size; 0: none",
    )
    packed.add_argument(
        "--pack-repeats", type=int, default=1, help="each arm's repeats, alternating (median)"
    )
    packed.add_argument(
        "--pack-train-examples", type=int, help="data.max_train_examples; default 512 (--quick: 64)"
    )
    packed.add_argument(
        "--pack-eval-examples", type=int, help="data.max_eval_examples; default 200 (--quick: 32)"
    )
    packed.add_argument(
        "--pack-source-length", type=int, help="data.max_source_length; default: the config's (--quick: 48)"
    )


def fill_defaults(args: argparse.Namespace) -> None:
    """--quick's values, or the full run's, where the command line left an option unset."""
    quick_pack = {
        "pack_backbones": ["tiny_t5"],
        "pack_sizes": [1, 2],
        "pack_steps": 4,
        "pack_train_examples": 64,
        "pack_eval_examples": 32,
        "pack_source_length": 48,
    }
    full_pack = {
        "pack_backbones": ["minilm_l6", "smollm2_135m"],
        "pack_sizes": [1, 2, 4, 8],
        "pack_steps": 30,
        "pack_train_examples": 512,
        "pack_eval_examples": 200,
    }
    for key, value in (quick_pack if args.quick else full_pack).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:  # GPU steps take milliseconds: more repeats cost nothing there
        args.repeats, args.grouping_batches = (10 if args.device == "cuda" else 2), 5
        args.backbones = args.backbones or ["t5_base_shape"]
        args.eval_examples, args.tta_target, args.compile = 64, 0.0, False
    args.backbones = args.backbones or ["t5_base_shape", "smollm2_135m"]


def parse_args(description: str) -> argparse.Namespace:
    """The command line, with --quick's and the default backbones filled in; `description`: --help's text."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for add in (add_shared_options, add_section_options, add_sections_option, add_packed_options):
        add(parser)
    args = parser.parse_args()
    fill_defaults(args)
    return args

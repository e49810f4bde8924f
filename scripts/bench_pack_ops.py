"""What a packed sweep's training step costs as the pack grows (K runs), here vs at another commit.

    python scripts/bench_pack_ops.py --base 22e2f2c                  # everything (hours on 2 cores)
    python scripts/bench_pack_ops.py --base 22e2f2c --backbones tiny_t5 --packs prompt_tuning --sizes 1 8
    python scripts/bench_pack_ops.py --base HEAD --quick --json out.json   # tiny T5, K = 1 2, dropout on
    python scripts/bench_pack_ops.py --base 22e2f2c --packs prompt_tuning --set data.max_source_length=32

Each measurement is one real packed sweep, `ptlab-train -m hydra/launcher=packed
hydra.launcher.pack_size=K seed=0,...,K-1 method=M` (the mixed pack: `method=prompt_tuning,smop,superpos`
x K/3 seeds, `hydra.launcher.mix_widths=true` where the tree has it), SST-2 (all 67k training rows
unless `--train-examples`; `data.max_eval_examples=16`), batch 8 per member, `logger=none`, one
thread, evaluation only at the end, no progress line between. It runs in-process in a child Python
process that calls `ptlab.cli.train.main` through `sys.argv` (the entry point every commit has),
with the code of a tree on `PYTHONPATH` and this venv: the base commit's in a git worktree under
outputs/bench/ (`bench_commits.checkout`), here's from this working tree (or `--here COMMIT`).
Every member's `summary.json` must say `pack_size` = K.

- ops/step: a `TorchDispatchMode` counts every ATen op of the whole command; the sweep is run for 4
  and for 12 steps and ops/step = (ops(12) - ops(4)) / 8, so loading, tokenizing, checkpoints and the
  final evaluation cancel out. Counted once per row and side (the count is deterministic).
- ms/step: a sweep of `--timing-steps` steps without the dispatch mode, after a 1-step warm-up sweep
  in the same process, with Python's garbage collector run before each sweep and off during it:
  else a full collection (the previous sweep's garbage, or the objects this sweep's setup made
  long-lived: ~0.25 s) lands in whichever timed step it falls due, on one side and not the other
  (it put tiny T5 K = 8 at 33 ms/step and K = 16 at 11). The pack's `train_seconds / steps` from its
  members' summary.json (the pack's wall time of the steps alone: no load, tokenization or
  evaluation, which the sweep's own wall time would add), median of `--repeats`.

Sides alternate (base, here, base, here, ... one child process each) so a busy machine slows both
alike. The table gives both sides, here/base (< 1: cheaper here) and, per side, ops(K) / ops(K0),
K0 = the pack kind's smallest K (1 for one method, 3 for the mixed pack). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_commits import REPO, checkout  # noqa: E402

METHODS = ["prompt_tuning", "smop", "superpos"]
PACKS = [*METHODS, "mixed"]
COUNT_STEPS = (4, 12)


@dataclass(frozen=True)
class Cell:
    """One row of the table: a packed sweep of `size` runs."""

    backbone: str
    dropout: bool
    pack: str  # a method, or "mixed": K/3 runs of each of METHODS
    size: int

    def label(self) -> str:
        return f"{self.backbone}, dropout {'on' if self.dropout else 'off'}, {self.pack}, K={self.size}"

    def sweep(self, steps: int, sweep_dir: Path, args: argparse.Namespace) -> List[str]:
        """The `ptlab-train` arguments of this sweep at `steps` steps."""
        seeds = self.size // len(METHODS) if self.pack == "mixed" else self.size
        method = ",".join(METHODS) if self.pack == "mixed" else self.pack
        return [
            "-m", "hydra/launcher=packed", f"hydra.launcher.pack_size={self.size}", f"hydra.sweep.dir={sweep_dir}",
            "task=sst2", f"backbone={self.backbone}", f"backbone.dropout={str(self.dropout).lower()}",
            f"method={method}", "seed=" + ",".join(str(seed) for seed in range(seeds)), "logger=none",
            "hardware.num_threads=1", f"trainer.batch_size={args.batch}", f"trainer.max_steps={steps}",
            f"trainer.eval_every={steps}", "trainer.log_every=1000", "data.max_eval_examples=16",
            f"data.max_train_examples={args.train_examples or 'null'}", *args.set,
        ]  # fmt: skip


def child(spec_path: str) -> None:
    """In the child process: run each command of the spec in-process, counting ATen ops where asked."""
    import gc
    from collections import Counter

    from hydra.core.global_hydra import GlobalHydra
    from torch.utils._python_dispatch import TorchDispatchMode

    import ptlab
    from ptlab.cli.train import main as train

    class OpCount(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    # a tree that packs one prompt width by default is told to mix them (the mixed pack is one pack);
    # read from its source, since the launcher's module moved (ptlab/cli/packed_launch.py at 22e2f2c)
    sources = Path(ptlab.__file__).parent.rglob("*.py")
    mixing = ["hydra.launcher.mix_widths=true"] if any("mix_widths: bool" in path.read_text() for path in sources) else []
    spec = json.loads(Path(spec_path).read_text())
    results = []
    for command in spec["commands"]:
        GlobalHydra.instance().clear()
        gc.collect()  # the last sweep's garbage (~60k objects, ~0.3 s) collected here, not in this one's steps
        gc.disable()  # nor the full collection that this sweep's setup makes due (~0.25 s, in whichever step)
        mixed = any(arg.startswith("method=") and "," in arg for arg in command["argv"])
        sys.argv = ["ptlab-train", *command["argv"], *(mixing if mixed else [])]
        counter = OpCount() if command["count"] else None
        started = time.perf_counter()
        try:
            with counter if counter is not None else contextlib.nullcontext():
                train()
        except SystemExit as stop:
            if stop.code not in (None, 0):
                raise
        finally:
            gc.enable()
        ops = dict(counter.ops) if counter is not None else None
        results.append({"wall_s": time.perf_counter() - started, "ops": ops})
    Path(spec["out"]).write_text(json.dumps({"ptlab": ptlab.__file__, "results": results}))


def members(sweep_dir: Path, cell: Cell, steps: int) -> List[Dict[str, Any]]:
    """The sweep's summaries, checked: K finished members, each trained `steps` steps in a pack of K."""
    summaries = [json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/summary.json"))]
    sizes = [summary.get("pack_size") for summary in summaries]
    if len(summaries) != cell.size or any(size != cell.size for size in sizes):
        sys.exit(f"bench_pack_ops: {cell.label()}: {len(summaries)} summaries, pack_size {sizes}, not {cell.size}")
    if any(summary["steps"] != steps or summary.get("status", "finished") != "finished" for summary in summaries):
        sys.exit(f"bench_pack_ops: {cell.label()}: a member did not finish {steps} steps ({sweep_dir})")
    return summaries


def child_env(tree: Path) -> Dict[str, str]:
    """The child's environment: `tree`'s code first on the path, offline, one thread, SST-2's files."""
    data = os.environ.get("PTLAB_DATA_DIR", str(REPO.parent / "shared" / "data"))
    return {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PTLAB_DATA_DIR": data}  # fmt: skip


def run_child(tree: Path, cell: Cell, counted: bool, args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """One child process on `tree`'s code: warm-up, timed sweep and, if `counted`, the two counted ones."""
    plan = [("warmup", 1, False), ("timed", args.timing_steps, False)]
    plan += [(f"count{steps}", steps, True) for steps in COUNT_STEPS] if counted else []
    folder = Path(tempfile.mkdtemp(dir=work))
    commands = [{"argv": cell.sweep(steps, folder / name, args), "count": count} for name, steps, count in plan]
    spec = {"out": str(folder / "out.json"), "commands": commands}
    (folder / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(folder / "spec.json")]
    for attempt in range(2):  # others may be editing the working tree: one retry a little later
        for name, _, _ in plan:  # a retry starts over: a finished member would be skipped, not trained
            shutil.rmtree(folder / name, ignore_errors=True)
        done = subprocess.run(command, cwd=tree, env=child_env(tree), capture_output=True, text=True)
        if done.returncode == 0:
            break
        print(f"  {tree}: {cell.label()} failed ({attempt + 1}/2):\n{done.stderr[-1500:]}", file=sys.stderr)
        time.sleep(20)
    else:
        sys.exit(f"bench_pack_ops: {tree}: {cell.label()} failed twice")
    out = json.loads(Path(spec["out"]).read_text())
    if not Path(out["ptlab"]).resolve().is_relative_to(tree.resolve()):
        sys.exit(f"bench_pack_ops: the child ran {out['ptlab']}, not the code in {tree}")
    found = {name: {**result, "members": members(folder / name, cell, steps)}
             for (name, steps, _), result in zip(plan, out["results"])}  # fmt: skip
    shutil.rmtree(folder)
    return found


def measure(cell: Cell, trees: Dict[str, Path], args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """Both sides of one row: ops/step counted once each, ms/step over `repeats` alternating rounds."""
    row: Dict[str, Any] = {"cell": asdict(cell)}
    ms: Dict[str, List[float]] = {side: [] for side in trees}
    for round_ in range(args.repeats):
        for side, tree in trees.items():
            found = run_child(tree, cell, round_ == 0, args, work)
            timed = found["timed"]["members"]
            walls = {name: run["wall_s"] for name, run in found.items()}
            row.setdefault("wall_s", {}).setdefault(side, []).append(walls)
            ms[side].append(max(member["train_seconds"] for member in timed) / args.timing_steps * 1e3)
            if round_ == 0:
                low, high = (found[f"count{steps}"]["ops"] for steps in COUNT_STEPS)
                span = COUNT_STEPS[1] - COUNT_STEPS[0]
                by_name = {op: (high.get(op, 0) - low.get(op, 0)) / span for op in set(high) | set(low)}
                row[side] = {
                    "ops_per_step": (sum(high.values()) - sum(low.values())) / span,
                    "ops_total": {str(steps): sum(found[f"count{steps}"]["ops"].values())
                                  for steps in COUNT_STEPS},  # fmt: skip
                    "ops_by_name": {op: n for op, n in sorted(by_name.items(), key=lambda kv: -kv[1]) if n},
                    "pack_size": sorted({member["pack_size"] for member in timed}),
                }
            print(f"  {cell.label()}, {side} ({round_ + 1}/{args.repeats}): "
                  f"{row[side]['ops_per_step']:.0f} ops/step, {ms[side][-1]:.1f} ms/step", file=sys.stderr, flush=True)  # fmt: skip
    for side in trees:
        row[side]["ms_runs"] = ms[side]
        row[side]["ms_per_step"] = statistics.median(ms[side])
    return row


def cells(args: argparse.Namespace) -> List[Cell]:
    """The table's rows, in order."""
    found = []
    for backbone in args.backbones:
        for dropout in args.dropout:
            for pack in args.packs:
                sizes = args.mixed_sizes if pack == "mixed" else args.sizes
                found += [Cell(backbone, dropout == "on", pack, size) for size in sizes]
    return found


def ratio(top: float, bottom: float) -> str:
    return f"{top / bottom:.2f}x" if bottom else "-"


def table(rows: List[Dict[str, Any]]) -> List[str]:
    """The markdown table: per row both sides' ops and ms per step, here/base, and ops(K)/ops(K0)."""
    lines = ["| backbone | dropout | pack | K | base ops/step | here ops/step | here/base | base ops K/K0 | "
             "here ops K/K0 | base ms/step | here ms/step | here/base |", "|---" * 12 + "|"]  # fmt: skip
    first: Dict[tuple, Dict[str, Any]] = {}
    for row in rows:
        cell = row["cell"]
        kind = (cell["backbone"], cell["dropout"], cell["pack"])
        first.setdefault(kind, row)
        (base_ops, here_ops), (base_ms, here_ms) = ([row[side][key] for side in ("base", "here")]
                                                    for key in ("ops_per_step", "ms_per_step"))  # fmt: skip
        k0 = first[kind]
        lines.append(
            f"| {cell['backbone']} | {'on' if cell['dropout'] else 'off'} | {cell['pack']} | {cell['size']} | "
            f"{base_ops:.0f} | {here_ops:.0f} | {ratio(here_ops, base_ops)} | "
            f"{ratio(base_ops, k0['base']['ops_per_step'])} | {ratio(here_ops, k0['here']['ops_per_step'])} | "
            f"{base_ms:.1f} | {here_ms:.1f} | {ratio(here_ms, base_ms)} |"
        )
    return lines


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="the commit to compare with (e.g. 22e2f2c); required")
    parser.add_argument("--here", help="a commit to run as 'here' instead of this working tree")
    parser.add_argument("--backbones", nargs="+", default=["tiny_t5", "tiny_llama", "tiny_bert"])
    parser.add_argument("--dropout", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--packs", nargs="+", choices=PACKS, default=PACKS, help="one method per pack, or mixed")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="K of one-method packs")
    parser.add_argument("--mixed-sizes", type=int, nargs="+", default=[3, 6, 12], help="K of mixed packs (x3)")
    parser.add_argument("--batch", type=int, default=8, help="trainer.batch_size of each member")
    parser.add_argument("--train-examples", type=int, default=0, help="data.max_train_examples (0: all)")
    parser.add_argument("--timing-steps", type=int, default=12, help="steps of the timed sweep")
    parser.add_argument("--repeats", type=int, default=3, help="timed sweeps per side (median)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny_t5, K = 1 2, dropout on, prompt_tuning, 1 repeat, 512 rows")  # fmt: skip
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more ptlab-train overrides for every sweep, e.g. data.max_source_length=32")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.backbones, args.sizes, args.dropout, args.packs = ["tiny_t5"], [1, 2], ["on"], ["prompt_tuning"]
        args.repeats = 1
        args.train_examples = args.train_examples or 512
    if args.child is None and args.base is None:
        parser.error("--base is required")
    if any(size % len(METHODS) for size in args.mixed_sizes):
        parser.error(f"--mixed-sizes must be multiples of {len(METHODS)}")
    return args


def main() -> None:
    args = parse()
    if args.child:
        child(args.child)
        return
    trees = {"base": checkout(args.base), "here": checkout(args.here) if args.here else REPO}
    todo = cells(args)
    print(f"bench_pack_ops: {len(todo)} rows x {len(trees)} sides; base {trees['base']}, here {trees['here']}",
          file=sys.stderr, flush=True)  # fmt: skip
    rows, started = [], time.perf_counter()
    (REPO / "outputs" / "bench").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / "outputs" / "bench", prefix="pack-ops-") as work:
        for index, cell in enumerate(todo):
            print(f"[{index + 1}/{len(todo)}] {cell.label()} ({time.perf_counter() - started:.0f} s so far)",
                  file=sys.stderr, flush=True)  # fmt: skip
            rows.append(measure(cell, trees, args, Path(work)))
    print(f"\npacked sweep steps, batch {args.batch} per member, SST-2, one thread; ops/step = (ATen ops of the "
          f"whole sweep at {COUNT_STEPS[1]} steps - at {COUNT_STEPS[0]}) / {COUNT_STEPS[1] - COUNT_STEPS[0]}; "
          f"ms/step = the pack's train_seconds / steps over {args.timing_steps} steps, median of {args.repeats}; "
          f"base = {args.base}, here = {args.here or 'working tree'}; K0 = 1 (one method), 3 (mixed); "
          f"{' '.join(args.set) + '; ' if args.set else ''}"
          f"every member's pack_size = K (checked)\n")  # fmt: skip
    print("\n".join(table(rows)))
    print(f"\n(machine: {os.cpu_count()} cores, {time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"base": args.base, "here": args.here or "working tree", "rows": rows,
                                         "settings": {k: v for k, v in vars(args).items() if k != "json"}},
                                        indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()

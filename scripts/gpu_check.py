"""The GPU check: everything ptlab's CUDA path must do, measured in one go on a bare GPU machine.

    python3 scripts/gpu_check.py --out DIR     # = make gpu-check; needs .gpu-pack (make gpu-pack)
    python3 scripts/gpu_check.py --dry-run     # = make gpu-check DRY_RUN=1: the same steps on the CPU

Installs the kit's wheels with no network, then runs, each step with its own time limit and all
within --budget-s (8 minutes; --no-time-limits lifts both): the CUDA tests (`pytest -m cuda`), `scripts/bench.py --device cuda
--quick` against PEFT, the default job with `hardware=gpu logger=none`, a `stages=fpt` run, a
`method=smop` run, a `method=deep_prompt` run, the default job with `trainer.compile=true` and
`scripts/bench.py --sections packed` (packed sweeps vs the same runs one after another, T5-base
shape; last, so a tight budget skips it first: `--only packed` runs it alone). It writes one results file,
DIR/gpu-check.md (rewritten after every step, so a check cut short still reports what it measured),
and DIR/gpu-check.log with every step's output; it exits non-zero if any step failed.

The dry run installs the wheels for Python 3.12 into a scratch folder (proving the kit installs)
but runs with the current interpreter's packages, on the CPU, with small step counts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from gpu_pack import GPU_PLATFORM  # noqa: E402

VERSIONS = """
import importlib.metadata as m, platform, torch
import ptlab.training.job  # every import a run needs
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), GPU: {gpu}")
print(", ".join(f"{n} {m.version(n)}" for n in
      ("transformers", "peft", "datasets", "pyarrow", "hydra-core", "omegaconf", "safetensors")))
"""
RUN_KEYS = (
    "best",
    "steps",
    "train_seconds",
    "wall_seconds",
    "load_seconds",
    "examples_per_s",
    "peak_memory_mb",
)


@dataclass
class Step:
    name: str
    command: List[str]
    limit_s: int
    run_dir: Optional[Path] = None  # a training run: its summary.json goes into the results
    status: str = "not run"
    seconds: float = 0.0
    output: str = ""
    skip: str = ""  # why this machine does not run it (the step passes)


@dataclass
class Check:
    args: argparse.Namespace
    steps: List[Step] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def environment(self, site: Path) -> dict:
        paths = [str(self.args.pack / "site"), str(REPO)]
        if not self.args.dry_run:
            paths.insert(0, str(site))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]),
            "PTLAB_DATA_DIR": str(self.args.pack / "data"),
            "PTLAB_CACHE": str(self.args.work / "cache"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(self.args.work / "datasets"),
            "TOKENIZERS_PARALLELISM": "false",
            "WANDB_MODE": "disabled",
            "TQDM_DISABLE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        if self.args.dry_run:
            env["PTLAB_CUDA_TESTS_ON_CPU"] = "1"
        return env

    def run(self, step: Step, env: dict) -> None:
        if step.skip:
            step.status = f"skipped ({step.skip})"
            return
        left = self.args.budget_s - (time.perf_counter() - self.started)
        if left < 20 and not self.args.no_time_limits:
            step.status = "skipped (budget spent)"
            return
        began = time.perf_counter()
        try:
            result = subprocess.run(
                step.command,
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=None if self.args.no_time_limits else min(step.limit_s, left),
            )
            step.output = result.stdout + result.stderr
            step.status = "ok" if result.returncode == 0 else f"failed (exit {result.returncode})"
        except subprocess.TimeoutExpired as timeout:
            step.output = f"{timeout.stdout or ''}{timeout.stderr or ''}"
            step.status = f"timed out after {timeout.timeout:.0f} s"
        step.seconds = time.perf_counter() - began

    def report(self) -> str:
        mode = "DRY RUN on the CPU (rehearsal; no GPU numbers)" if self.args.dry_run else "CUDA"
        lines = [
            "# GPU check",
            "",
            f"`{' '.join(shlex.quote(a) for a in sys.argv)}` — {mode}, {time.strftime('%Y-%m-%d %H:%M')} "
            f"on {platform.node()}, {time.perf_counter() - self.started:.0f} s in all.",
            "",
            "| step | status | seconds |",
            "|---|---|---|",
            *(f"| {s.name} | {s.status} | {s.seconds:.0f} |" for s in self.steps),
        ]
        by_name = {step.name: step for step in self.steps}
        by_name.setdefault("cuda tests", Step("cuda tests", [], 0))
        by_name.setdefault("bench", Step("bench", [], 0))
        by_name.setdefault("packed sweep", Step("packed sweep", [], 0))
        if by_name["environment"].status == "ok":
            lines += ["", "## Environment", "", *by_name["environment"].output.strip().splitlines()]
        if by_name["cuda tests"].output:
            summary = [
                line
                for line in by_name["cuda tests"].output.splitlines()
                if " in " in line and "passed" in line
            ]
            lines += ["", "## `pytest -m cuda`", "", *(summary[-1:] or ["(no summary line)"])]
        table = [line for line in by_name["bench"].output.splitlines() if line.startswith("|")]
        if table:
            lines += ["", "## `scripts/bench.py --quick`: ptlab vs PEFT and vs the long prompt", "", *table]
        multi = [line for line in by_name.get("multi-device", Step("", [], 0)).output.splitlines() if line.startswith("|")]
        if multi:
            lines += ["", "## Multi-device (`scripts/bench_placement.py`): the packed sweep on one device vs all", "",
                      *multi]  # fmt: skip
        table = [line for line in by_name["packed sweep"].output.splitlines() if line.startswith("|")]
        if table:
            lines += [
                "",
                "## Packed sweeps (`scripts/bench.py --sections packed`): K runs packed vs one after "
                "another; target on the GPU: at least 6x less wall time at K=8 on the T5-base shape",
                "",
                *table,
            ]
        lines += runs_table(self.steps)
        for step in self.steps:
            if step.status not in ("ok", "not run") and not step.status.startswith("skipped"):
                tail = step.output.strip().splitlines()[-25:]
                lines += ["", f"## {step.name}: {step.status}", "", "```", *tail, "```"]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        self.args.out.mkdir(parents=True, exist_ok=True)
        (self.args.out / "gpu-check.md").write_text(self.report())
        log = [
            f"===== {s.name}: {s.status} ({s.seconds:.0f} s)\n$ {shlex.join(s.command)}\n{s.output}"
            for s in self.steps
        ]
        (self.args.out / "gpu-check.log").write_text("\n".join(log))


def runs_table(steps: List[Step]) -> List[str]:
    """The report's table of the training runs that wrote a summary (none: no lines)."""
    runs = [step for step in steps if step.run_dir and (step.run_dir / "summary.json").exists()]
    if not runs:
        return []
    lines = [
        "",
        "## Training runs (real SST-2, all-MiniLM-L6-v2 from the kit in fp16 weights, loaded as fp32)",
        "",
        "| run | command | best validation | steps | train s | wall s (load s) | train examples/s | peak memory | FLOPs ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for step in runs:
        summary = json.loads((step.run_dir / "summary.json").read_text())
        metric, floor = summary["main_metric"], summary["baseline"]
        overrides = " ".join(a for a in step.command[3:] if not a.startswith("hydra.run.dir"))
        lines.append(
            f"| {step.name} | `{overrides}` | {metric} {summary['best'][metric]:.4f} "
            f"({floor['name']} {floor[metric]:.3f}) | {summary['steps']} | "
            f"{summary['train_seconds']:.1f} | {summary['wall_seconds']:.1f} ({summary['load_seconds']:.1f}) | "
            f"{summary['examples_per_s']:.0f} | {summary['peak_memory_mb']:.0f} MiB | "
            f"{summary.get('flops_ratio', 1.0):.2f} |"
        )
    return lines


def packed_command(python: str, device: str, dry: bool, out: Path) -> List[str]:
    """The packed-sweep step: K = 1, 8, 32 PT-20 runs at bench.py's --batch (8) and the largest K at
    batch 32, on the random-init T5-base shape (bench.py's t5_base_shape); the dry run: --quick's
    tiny T5."""
    packed = [python, "scripts/bench.py", "--device", device, "--sections", "packed", "--out", str(out)]
    if dry:
        return packed + ["--quick", "--pack-backbones", "tiny_t5"]
    return packed + "--pack-backbones t5_base_shape --pack-sizes 1 8 32 --pack-batch 32".split()


def plan(args: argparse.Namespace, site: Path) -> List[Step]:
    python, dry = sys.executable, args.dry_run
    install = [python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile"]
    install += [*GPU_PLATFORM, "--target", str(site)] if dry else ["--target", str(site)]
    install += sorted(str(path) for path in (args.pack / "wheels").glob("*.whl"))
    device = "cpu" if dry else "cuda"
    bench_backbones = ["tiny_t5", "tiny_llama"] if dry else ["t5_base_shape", "smollm2_shape"]
    bench = [
        python,
        "scripts/bench.py",
        "--device",
        device,
        "--quick",
        "--no-real-eval",
        "--out",
        str(args.out),
    ]
    # the dry run keeps the jobs short; on the GPU they are the real default job
    small = [
        "trainer.max_steps=8",
        "trainer.eval_every=8",
        "data.max_train_examples=512",
        "data.max_eval_examples=64",
    ]
    job = [
        python,
        "-m",
        "ptlab.cli.train",
        "hardware=cpu" if dry else "hardware=gpu",
        "logger=none",
        *(small if dry else []),
    ]
    runs = args.work / "runs"

    def training(name: str, extra: List[str], limit_s: int) -> Step:
        return Step(name, [*job, *extra, f"hydra.run.dir={runs / name}"], limit_s, run_dir=runs / name)

    return [
        Step("install kit", install, 120),
        Step("environment", [python, "-c", VERSIONS], 60),
        Step(
            "cuda tests",
            [python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_cuda.py"],
            180,
        ),
        Step("bench", [*bench, "--backbones", *bench_backbones, *shlex.split(args.bench_args)], 180),
        training("default job", [], 120),
        training("fpt", ["stages=fpt"], 90),
        training("smop", ["method=smop"], 90),
        training("deep_prompt", ["method=deep_prompt"], 90),
        training("compile", ["trainer.compile=true"], 120),
        Step("packed sweep", packed_command(python, device, dry, args.out), 360),
        multi_device(python, dry, gpu_count(python) if not dry else 0),
    ]


def gpu_count(python: str) -> int:
    found = subprocess.run([python, "-c", "import torch; print(torch.cuda.device_count())"], capture_output=True,
                           text=True)  # fmt: skip
    return int(found.stdout.strip() or 0) if found.returncode == 0 else 0


def multi_device(python: str, dry: bool, gpus: int) -> Step:
    """The 8-job packed sweep in one process vs one worker per GPU (`hydra.launcher.workers`); on the
    CPU rehearsal, 2 workers splitting the cores; skipped on a machine with one GPU."""
    command = [python, "scripts/bench_placement.py", "--jobs", "8", "--pack-size", "4"]
    if dry:
        return Step("multi-device", [*command, "--workers", "2", "--backbone", "tiny_t5", "--steps", "6", "--repeats",
                                     "1"], 300)  # fmt: skip
    step = Step("multi-device", [*command, "--workers", str(gpus), "--hardware", "gpu", "--backbone",
                                 "t5_base_shape", "--steps", "40", "--repeats", "2"], 600)  # fmt: skip
    step.skip = "" if gpus > 1 else f"{gpus} GPU: the step needs more than one"
    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pack", type=Path, default=REPO / ".gpu-pack", help="the kit (make gpu-pack)")
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default outputs/gpu-check/<time>)"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="run folders and caches (default: beside --out)"
    )
    parser.add_argument("--dry-run", action="store_true", help="rehearse on the CPU with small step counts")
    parser.add_argument("--budget-s", type=float, default=480, help="no step starts after this many seconds")
    parser.add_argument(
        "--no-time-limits",
        action="store_true",
        help="no budget and no step limit: every step runs to its end (a rehearsal on a busy machine, "
        "where seconds say nothing of the kit; tests/test_gpu_kit.py)",
    )
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (and the install)")
    parser.add_argument(
        "--bench-args", default="", help='more bench.py flags, e.g. "--batch 32 --seq-len 256"'
    )
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out = (args.out or REPO / "outputs" / "gpu-check" / stamp).resolve()
    args.work = (args.work or REPO / "outputs" / "gpu-check" / f"{stamp}-work").resolve()
    args.pack = args.pack.resolve()
    if not (args.pack / "manifest.json").exists():
        sys.exit(f"gpu_check: error: no kit at {args.pack}: run `make gpu-pack` on a machine with PyPI first")
    if not args.dry_run and os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        sys.exit("gpu_check: error: CUDA_VISIBLE_DEVICES is empty; use --dry-run to rehearse on the CPU")
    site = args.work / "site"
    steps = plan(args, site)
    if args.only:
        steps = [
            s for s in steps if s.name in ("install kit", "environment") or s.name.split()[0] in args.only
        ]
    check = Check(args, steps)
    env = check.environment(site)
    for step in check.steps:
        print(f"gpu_check: {step.name} ...", flush=True)
        check.run(step, env)
        print(f"gpu_check: {step.name}: {step.status} ({step.seconds:.0f} s)", flush=True)
        check.write()
        if step.name in ("install kit", "environment") and step.status != "ok":
            break  # nothing else can run
    print(f"gpu_check: results in {args.out / 'gpu-check.md'}")
    sys.exit(0 if all(step.status == "ok" or step.skip for step in check.steps) else 1)


if __name__ == "__main__":
    main()

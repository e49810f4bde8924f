"""What ptlab needs installed is what pyproject declares: every package ptlab's code imports is a
dependency (or, imported only where a feature needs it, in that feature's extra), nothing declared
goes unused, every extra that a message or a doc names exists, and the packages ptlab never imports
but declares are needed by what it calls (accelerate: transformers loads GGUF files only with it)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from typing import Dict, Set

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import OFFLINE_ENV, REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# declared, never imported by ptlab, and why each is needed
NOT_IMPORTED = {
    "gguf": "transformers reads GGUF files with it (backbone.gguf_file)",
    "accelerate": "transformers loads GGUF files only with it (the test below)",
    "hydra-submitit-launcher": "Hydra's plugin behind hydra/launcher=slurm",
    "hydra-optuna-sweeper": "Hydra's plugin behind hydra/sweeper=optuna",
}
# the package each feature's extra exists for
FEATURES = {"export": {"peft"}, "slurm": {"submitit", "hydra-submitit-launcher"}, "offline": {"gguf", "accelerate"},
            "sweep": {"hydra-optuna-sweeper"}}  # fmt: skip


def names(requirements) -> Set[str]:
    return {canonicalize_name(Requirement(line).name) for line in requirements}


def extras() -> Dict[str, Set[str]]:
    """Each extra's packages (`dev` aside: the tests' tools, not a feature of ptlab)."""
    return {name: names(lines) for name, lines in PYPROJECT["optional-dependencies"].items() if name != "dev"}


def imports() -> Dict[str, bool]:
    """Each distribution ptlab's code imports (ptlab/ and its Hydra plugin), and whether some module
    imports it when it loads (True) rather than only inside a function (False)."""
    distributions = importlib.metadata.packages_distributions()
    found: Dict[str, bool] = {}
    for path in [*(REPO / "ptlab").rglob("*.py"), *(REPO / "hydra_plugins").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        top_level = set(tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in {name.split(".")[0] for name in modules}:
                if module in sys.stdlib_module_names or module in ("ptlab", "hydra_plugins"):
                    continue
                assert module in distributions, f"{path}: imports {module}, which no installed package provides"
                for distribution in distributions[module]:
                    key = canonicalize_name(distribution)
                    found[key] = found.get(key, False) or node in top_level
    return found


def test_every_package_ptlab_imports_is_declared_and_nothing_declared_goes_unused():
    dependencies, optional = names(PYPROJECT["dependencies"]), set().union(*extras().values())
    imported = imports()
    assert {"numpy", "pyyaml", "filelock"} <= set(imported)  # the ones that once came only through others
    undeclared = {name for name, at_load in imported.items()
                  if name not in dependencies and (at_load or name not in optional)}  # fmt: skip
    assert not undeclared, f"imported by ptlab, not declared (or imported at load but only in an extra): {undeclared}"
    unused = (dependencies | optional) - set(imported) - set(NOT_IMPORTED)
    assert not unused, f"declared, imported by nobody in ptlab, and no reason given: {unused}"


def test_every_extra_exists_for_its_feature_and_every_one_named_exists():
    declared = extras()
    for extra, packages in FEATURES.items():
        assert packages <= declared[extra], (extra, declared[extra])
    texts = [path.read_text() for pattern in ("ptlab/**/*.py", "docs/*.md", "conf/**/*.yaml", "README.md", "Makefile")
             for path in REPO.glob(pattern)]  # fmt: skip
    named = {extra for text in texts for group in re.findall(r"(?:ptlab|\.)\[([a-z,]+)\]", text) for extra in group.split(",")}
    assert {"export", "slurm", "sweep", "offline"} <= named  # the messages and docs that name them were read
    assert named <= set(PYPROJECT["optional-dependencies"]), named - set(PYPROJECT["optional-dependencies"])


BLOCK_ACCELERATE = """
import sys

class Hide:
    \"\"\"Every import finder as it was, except that none finds accelerate: as if not installed.\"\"\"
    def __init__(self, finder):
        self.finder = finder
    def __getattr__(self, name):  # find_distributions, invalidate_caches, ...
        return getattr(self.finder, name)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "accelerate":
            return None
        return self.finder.find_spec(name, path, target)

sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
"""


def test_loading_a_gguf_backbone_needs_accelerate(tmp_path):
    from helpers import write_tiny_gguf

    write_tiny_gguf((tmp_path / "model").mkdir() or tmp_path / "model" / "tiny.gguf")
    probe = BLOCK_ACCELERATE + f"""
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, gguf_file="tiny.gguf")
except Exception as error:
    print("transformers:", error)
from ptlab.errors import ConfigError
from ptlab.model.loading import load_model_and_tokenizer
from ptlab.config.schema import BackboneConfig
try:
    load_model_and_tokenizer(BackboneConfig(name="tiny", family="causal", path={str(tmp_path / "model")!r},
                                            gguf_file="tiny.gguf"), AutoModelForCausalLM)
except ConfigError as error:
    print("ptlab:", error)
"""
    env = {**OFFLINE_ENV, "PATH": "/usr/bin:/bin", "PTLAB_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "transformers: accelerate is required when loading a GGUF file" in lines[0]
    assert lines[1] == ("ptlab: backbone.gguf_file='tiny.gguf': transformers needs accelerate to read a GGUF "
                        "file: pip install 'ptlab[offline]'")  # fmt: skip
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").glob("tiny-*"))

"""The package's shape: the layers hold (import-linter, imports inside functions count), the wheel's package list
is every folder of ptlab/, docs/architecture.md names every module there is, no module passes 450
lines nor any function 60, and a module dropped into a registry's package registers itself."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import tomllib

from conftest import REPO

PACKAGE = REPO / "ptlab"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> Dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter over the package under `root`, with the contracts of pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [str(Path(sys.executable).parent / "lint-imports"), "--no-cache", "--config", str(REPO / "pyproject.toml")]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)


def test_the_layers_of_the_architecture_doc_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout
    assert "3 kept, 0 broken" in result.stdout


def test_the_layers_contract_catches_an_import_up_inside_a_function(tmp_path):
    """The config layer reaching up into training, from inside a function as imports that only a
    run needs are written: the contract sees it and names both ends."""
    shutil.copytree(PACKAGE, tmp_path / "ptlab", ignore=shutil.ignore_patterns("__pycache__"))
    schema = tmp_path / "ptlab" / "config" / "schema.py"
    schema.write_text(schema.read_text() + "\n\ndef planted():\n    from ptlab.training import loop\n\n    return loop\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1
    assert "ptlab's layers BROKEN" in result.stdout
    assert "ptlab.config.schema -> ptlab.training.loop" in result.stdout


def test_every_ptlab_import_names_a_module_that_exists():
    """In the package, the tests and the scripts: a module moved leaves no import of its old name."""
    known = set(modules())
    stale = []
    sources = {
        **modules(),
        **{str(p.relative_to(REPO)): p for d in ("tests", "scripts") for p in (REPO / d).rglob("*.py")},
    }
    for name, path in sources.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                stale += [
                    f"{name}: import {a.name}"
                    for a in node.names
                    if a.name.startswith("ptlab") and a.name not in known
                ]
            elif (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("ptlab")
            ):
                if node.module not in known:
                    stale.append(f"{name}: from {node.module}")
                elif node.module == "ptlab":
                    stale += [
                        f"{name}: from ptlab import {a.name}"
                        for a in node.names
                        if f"ptlab.{a.name}" not in known
                    ]
    assert stale == []


def test_the_wheel_lists_every_package_and_ships_conf():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {module_name(init) for init in PACKAGE.rglob("__init__.py")}
    assert set(config["packages"]) == folders | {"ptlab.conf", "hydra_plugins.ptlab_launcher"}
    assert config["package-dir"]["ptlab.conf"] == "conf"


def test_architecture_doc_names_every_module():
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(ptlab/[\w/]+\.py)`", section))
    actual = {str(path.relative_to(REPO)) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    assert named == actual, (sorted(actual - named), sorted(named - actual))


def test_every_file_fits_in_450_lines_and_every_function_in_60():
    """A module past 450 lines does more than one job, a function past 60 has a piece that belongs
    elsewhere (docs/architecture.md); scripts are code that users run and read too. Classes have no
    cap of their own: a class that is one idea (the training loop's `Pack`) stays whole in its module."""
    too_long = []
    for path in sorted([*(REPO / "ptlab").rglob("*.py"), *(REPO / "scripts").rglob("*.py")]):
        tree = ast.parse(path.read_text())
        if tree.body and tree.body[-1].end_lineno > 450:
            too_long.append(f"{path.relative_to(REPO)}: {tree.body[-1].end_lineno} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines")
    assert too_long == []


def test_cfg_is_only_ever_a_composed_dictconfig():
    """One name for each kind of config (docs/architecture.md, "Names"): a parameter or field named
    `cfg` is a DictConfig, and no object keeps a structured config as `self.cfg`."""
    wrong = []
    for path in sorted((REPO / "ptlab").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.arg) and node.arg == "cfg":
                typed = ast.unparse(node.annotation) if node.annotation else "no type"
                if typed != "DictConfig":
                    wrong.append(f"{where} parameter cfg: {typed}")
            if isinstance(node, ast.AnnAssign) and ast.unparse(node.target) == "cfg":
                if ast.unparse(node.annotation) != "DictConfig":
                    wrong.append(f"{where} field cfg: {ast.unparse(node.annotation)}")
            if isinstance(node, ast.Attribute) and node.attr == "cfg" and ast.unparse(node.value) == "self":
                wrong.append(f"{where} self.cfg")
    assert wrong == []


DROPPED = {  # a registry's package, the module dropped into it, and what it registers
    "methods": (
        "ptlab.methods", "echo_prompt", "method.name",
        "from dataclasses import dataclass\n"
        "from ptlab.methods import Method, register\n"
        "from ptlab.methods.prompt_tuning import PromptTuning, PromptTuningConfig\n\n"
        "@dataclass\nclass EchoConfig(PromptTuningConfig):\n    name: str = 'echo_prompt'\n\n"
        "@register('echo_prompt', EchoConfig)\nclass EchoPrompt(PromptTuning):\n    pass\n\n"
        "EXPECTED = Method('echo_prompt', EchoConfig, EchoPrompt)\n",
    ),
    "families": (
        "ptlab.model.families", "echo_family", "backbone.family",
        "from ptlab.model.families import Family, register\n"
        "from ptlab.model.families.seq2seq import Seq2SeqBackbone\n\n"
        "@register('echo_family')\nclass EchoBackbone(Seq2SeqBackbone):\n    pass\n\n"
        "EXPECTED = Family('echo_family', EchoBackbone)\n",
    ),
}


@pytest.mark.parametrize("registry", sorted(DROPPED))
def test_a_module_dropped_into_a_registry_package_registers_itself(registry, tmp_path, monkeypatch):
    """No import list to extend: a new module in ptlab/methods/ or ptlab/model/families/ is found,
    registers its record, and an unknown name is one line naming the known ones."""
    import importlib
    import sys

    from ptlab.errors import ConfigError

    package_name, name, key, source = DROPPED[registry]
    package = importlib.import_module(package_name)
    table = package.METHODS if registry == "methods" else package.FAMILIES
    before = set(table.all())
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    monkeypatch.setattr(table, "entries", dict(table.entries))
    monkeypatch.setattr(table, "imported", set(table.imported))
    try:
        assert table[name] == sys.modules[f"{package_name}.{name}"].EXPECTED
        assert set(table.all()) == before | {name}
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}='nothing' is not registered; known: \["):
            table["nothing"]
    finally:
        sys.modules.pop(f"{package_name}.{name}", None)


def test_a_family_without_what_every_family_must_define_is_refused_at_import_naming_it():
    from ptlab.model.backbone import Backbone
    from ptlab.model.families import register
    from ptlab.model.families.encoder import EncoderBackbone

    with pytest.raises(TypeError, match=r"^family 'bare' \(Bare\) must define auto_class, runs_logits, "
                                        r"runs_scores, forward_flops \(docs/architecture.md, 'A family'\)$"):  # fmt: skip
        register("bare")(type("Bare", (Backbone,), {}))
    with pytest.raises(TypeError, match=r"must define forward_flops "):

        @register("uncounted")
        class Uncounted(Backbone):
            auto_class = object
            runs_logits = EncoderBackbone.runs_logits
            runs_scores = EncoderBackbone.runs_scores

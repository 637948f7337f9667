"""The repository root is a package, never an import root.

`python -m ...`, `python -c ...` and a notebook started in the repository root put the root first on ``sys.path``.
Its folders carry generic names (``kernels``, ``nodes``, ``pipelines``, ``training``, ...), and transformers >= 5.25
imports the Hugging Face distribution ``kernels``: a regular package of ours under that name would shadow it. These
tests start real interpreters from the root, as a user does.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN_IMPORT = re.compile(r"^\s*(?:from|import)\s+(kernels|nodes|pipelines|training|benchmarks|models|tests|cli)\b",
                        re.MULTILINE)


def _run_from_root(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _top_level_names() -> list[str]:
    """Every name the root offers to ``import`` when it is on ``sys.path``."""
    names = []
    for entry in ROOT.iterdir():
        name = entry.stem if entry.suffix == ".py" else entry.name
        if entry.is_dir() or entry.suffix == ".py":
            if name.isidentifier() and not name.startswith("__"):
                names.append(name)
    return sorted(set(names))


def test_the_root_offers_only_namespace_folders():
    modules = [p.name for p in ROOT.glob("*.py") if not p.name.startswith("__")]
    assert modules == [], f"top-level modules shadow installed ones from the root: {modules}"
    regular = [p.parent.name for p in ROOT.glob("*/__init__.py")]
    assert regular == [], f"these folders are regular packages and shadow installed ones from the root: {regular}"


def test_installed_distributions_win_over_the_roots_folders(tmp_path):
    names = _top_level_names()
    assert {"kernels", "nodes", "pipelines", "training", "tests"} <= set(names)
    for name in names:  # a regular package of each name, as an installed distribution would be
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("INSTALLED = True\n")
    code = "import importlib, sys\n" + "".join(
        f"assert getattr(importlib.import_module({n!r}), 'INSTALLED', False), {n!r}\n" for n in names)
    done = _run_from_root("-c", code, env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr


def test_transformers_and_diffusers_load_their_peft_code_from_the_root():
    code = (
        "import oneforcing\n"
        "import transformers.modeling_utils, diffusers.loaders\n"
        "from diffusers import AutoencoderKLWan\n"  # what failed: diffusers' LoRA/PEFT code imports `kernels`
        "import importlib.util, pathlib\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else None)\n"
    )
    done = _run_from_root("-c", code)
    assert done.returncode == 0, done.stderr
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    origin = done.stdout.strip().splitlines()[-1]
    assert origin != "None" and not origin.startswith(str(ROOT)), origin


@pytest.mark.parametrize("module", ["oneforcing", "oneforcing.training"])
def test_module_entry_points_run_from_the_root(module):
    done = _run_from_root("-m", module, "--help")
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_the_package_imports_itself_only_relatively():
    offenders = []
    for path in ROOT.rglob("*.py"):
        if path.parts[len(ROOT.parts)] in {"tests", "benchmarks", ".git"}:
            continue
        for match in OWN_IMPORT.finditer(path.read_text()):
            offenders.append(f"{path.relative_to(ROOT)}: {match.group(0).strip()}")
    assert offenders == [], "absolute imports of the root's folders resolve to other packages: " + "; ".join(offenders)

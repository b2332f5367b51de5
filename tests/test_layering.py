"""The layers hold: imports point down (hfedmoe < export < device_agent | server < lab <
benchmarks), the transport imports no torch, and no package has an import cycle between its
modules. The contracts live in pyproject.toml ([tool.importlinter]); import-linter (grimp) reads
every import statement, function-local ones included."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hfedmoe", "export", "device_agent", "server", "lab", "benchmarks")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` over the packages under ``root`` with the contracts of its pyproject."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True))")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_kit_keeps_its_layers():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    """The kit's packages and contracts, copied to be broken."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _append(path: Path, code: str) -> None:
    path.write_text(path.read_text() + "\n\n" + code + "\n")


@pytest.mark.parametrize(("module", "code", "contract"), [
    # an upward import hidden inside a function: the core reaching into the device agent
    ("hfedmoe/names.py", "def _hidden():\n    from device_agent.budget import Budget\n"
                         "    return Budget", "Layers"),
    # siblings: the server importing the device agent
    ("server/store/sql.py", "def _hidden():\n    import device_agent.profiles\n"
                        "    return device_agent.profiles", "Layers"),
    # export importing the device agent (what export/training.py once did)
    ("export/common.py", "def _hidden():\n    from device_agent import train\n    return train",
     "Layers"),
    ("hfedmoe/transport/topics.py", "def _hidden():\n    import torch\n    return torch",
     "no torch"),
    # a cycle inside the core: wire <-> update
    ("hfedmoe/update.py", "def _hidden():\n    from hfedmoe import wire\n    return wire",
     "No import cycles"),
])
def test_a_broken_contract_fails(tree_copy: Path, module: str, code: str, contract: str):
    assert lint_imports(tree_copy).returncode == 0  # the copy holds, as the kit does
    _append(tree_copy / module, code)
    out = lint_imports(tree_copy)
    assert out.returncode != 0
    broken = out.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, out.stdout

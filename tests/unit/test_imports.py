"""No module imports the bare folders (``import master``): that would load a second copy of it.

The folders common/, master/, worker/ and client/ are the packages poolfleet.common and
so on; only the ``poolfleet.`` names are the real ones. ruff's banned-api rule says the
same; this test also covers files ruff is not run on.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BARE = {"master", "common", "worker", "client"}
SKIP_DIRS = {".venv", "build", "dist", ".git", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


def python_files() -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        out += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(out)


def bare_imports(source: str, filename: str = "<src>") -> list[str]:
    """Every ``import X`` / ``from X import`` whose top-level name is one of the bare folders."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"line {node.lineno}: {n}" for n in names if n.split(".")[0] in BARE]
    return found


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("import master", True),
        ("import common.codec as c", True),
        ("from worker import task", True),
        ("from client.client import Client", True),
        ("def f():\n    import master.state\n", True),
        ("import poolfleet.master", False),
        ("from poolfleet.common import codec", False),
        ("from . import codec", False),
        ("import mastermind, clients", False),
    ],
)
def test_detector(source: str, bad: bool) -> None:
    assert bool(bare_imports(source)) is bad


def test_the_tree_is_scanned() -> None:
    files = {p.relative_to(ROOT).as_posix() for p in python_files()}
    assert {"common/codec.py", "master/server.py", "worker/daemon.py", "client/client.py"} <= files
    assert not any(f.startswith(".venv/") for f in files)


def test_no_bare_folder_imports_anywhere() -> None:
    offenders = []
    for path in python_files():
        for hit in bare_imports(path.read_text(), str(path)):
            offenders.append(f"{path.relative_to(ROOT)} {hit}")
    assert offenders == [], "import poolfleet.<package>, never the bare folder:\n" + "\n".join(offenders)

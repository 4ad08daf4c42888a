"""A regular (non-editable) build: the wheel holds every module and the three console scripts.

The build runs on a copy of the source tree: setuptools reuses ``build/lib`` between
builds, so building in place could pass on files left there by an earlier build.
"""

from __future__ import annotations

import configparser
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "master", "worker", "client")
NOT_COPIED = {".venv", "build", "dist", ".git", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"}
SCRIPTS = {
    "pmaster": "poolfleet.master.cli:main",
    "pworker": "poolfleet.worker.cli:main",
    "ptask": "poolfleet.client.cli:main",
}


def _ignore(_dir: str, names: list[str]) -> set[str]:
    return {n for n in names if n in NOT_COPIED or n.endswith(".egg-info") or n == "__pycache__"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_ignore)
    out = tmp / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", str(out)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(out.glob("poolfleet-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def expected_modules() -> set[str]:
    """``poolfleet/<package>/...py`` for every .py file of the four source folders."""
    out = set()
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT / pkg)
            if "__pycache__" not in rel.parts:
                out.add(f"poolfleet/{pkg}/{rel.as_posix()}")
    return out


def test_wheel_contains_every_module(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = expected_modules()
    assert len(expected) > 30  # the source tree was found
    missing = sorted(expected - names)
    assert missing == [], f"modules missing from the wheel: {missing}"
    for pkg in PACKAGES:
        assert f"poolfleet/{pkg}/py.typed" in names
    # only the poolfleet namespace: no bare folders, no tests
    stray = sorted(n for n in names if not n.startswith(("poolfleet/", "poolfleet-")))
    assert stray == []


def test_wheel_declares_the_console_scripts(wheel: Path) -> None:
    zf = zipfile.ZipFile(wheel)
    [ep_name] = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(zf.read(ep_name).decode())
    assert dict(parser["console_scripts"]) == SCRIPTS


def test_modules_import_from_the_unpacked_wheel(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    modules = sorted(
        n[: -len(".py")].replace("/", ".").removesuffix(".__init__")
        for n in zipfile.ZipFile(wheel).namelist()
        if n.endswith(".py")
    )
    script = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(target)!r})\n"
        "bad = []\n"
        f"for name in {modules!r}:\n"
        "    mod = importlib.import_module(name)\n"
        f"    if not mod.__file__.startswith({str(target)!r}):\n"
        "        bad.append((name, mod.__file__))\n"
        "print(bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_wheel_carries_the_dashboard_assets(wheel: Path, tmp_path: Path) -> None:
    """pmaster serves the dashboard from package data: every file under static/ is in the
    wheel, and the unpacked wheel's dashboard finds them (no source tree, no network)."""
    static = ROOT / "master" / "dashboard" / "static"
    expected = {
        f"poolfleet/master/dashboard/static/{p.relative_to(static).as_posix()}"
        for p in static.rglob("*")
        if p.is_file()
    }
    assert {
        "poolfleet/master/dashboard/static/app.js",
        "poolfleet/master/dashboard/static/vendor/uPlot.LICENSE",
    } <= expected
    names = set(zipfile.ZipFile(wheel).namelist())
    assert sorted(expected - names) == []
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(target)!r})\n"
        "from poolfleet.master.dashboard.server import _static_files\n"
        "print(json.dumps(sorted(_static_files())))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(proc.stdout)
    assert served == sorted(n.removeprefix("poolfleet/master/dashboard") for n in expected)

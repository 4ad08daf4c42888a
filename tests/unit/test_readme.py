"""The README's claims that can drift from the code: the dependency count, the CI entry point."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NUMBERS = {"three": 3, "four": 4, "five": 5, "six": 6, "seven": 7}


def test_readme_names_every_runtime_dependency_and_counts_them_right() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0] for d in deps]
    text = " ".join((ROOT / "README.md").read_text().split())
    m = re.search(r"(\w+) dependencies \(([^)]*)\)", text)
    assert m is not None, "the README should say how many dependencies poolfleet has"
    assert NUMBERS[m.group(1)] == len(names)
    assert [n.strip() for n in m.group(2).split(",")] == names


def test_readme_says_which_tests_skip_and_how_ci_provides_them() -> None:
    text = " ".join((ROOT / "README.md").read_text().split())
    assert "`.ci/run`" in text and (ROOT / ".ci" / "run").is_file()
    assert "skip without it" in text


def test_license_is_an_spdx_string() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"

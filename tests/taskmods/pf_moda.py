"""Tasks of module A only: workers started with ``--tasks pf_moda`` offer them."""

from __future__ import annotations

import os


def fa(x: int) -> list[object]:
    return ["a", x, os.getpid()]


def double_it(x: int) -> int:
    return 2 * x

"""Tasks of module B only: workers started with ``--tasks pf_modb`` offer them."""

from __future__ import annotations

import os


def fb(x: int) -> list[object]:
    return ["b", x, os.getpid()]

"""Tasks of module C only: a module that no worker loads until one is started with it."""

from __future__ import annotations

import os


def fc(x: int) -> list[object]:
    return ["c", x, os.getpid()]

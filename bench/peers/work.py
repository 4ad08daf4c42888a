"""The peers' task functions (``bench.tasks.burn`` is the cpu task): importable by their workers."""

from __future__ import annotations

import time


def noop(*_: object) -> None:
    """Nothing at all (an argument is taken and ignored, for ``map`` APIs)."""


def sleep(seconds: float) -> None:
    """The io task: block this thread for ``seconds``."""
    time.sleep(seconds)


class Sleeper:
    """The io task as an actor method, for a peer whose concurrency lives in an actor (Ray)."""

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

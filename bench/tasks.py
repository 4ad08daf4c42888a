"""Task functions of the benchmark; workers load this module with ``--tasks bench.tasks``."""

from __future__ import annotations


def burn(n: int) -> int:
    """A fixed amount of pure-Python CPU work: ``n`` loop turns of integer arithmetic."""
    acc = 0
    for i in range(n):
        acc = (acc + i * i) % 1_000_003
    return acc


def square(x: int) -> int:
    """A tiny call: what ``Pool.map`` of many calls maps."""
    return x * x

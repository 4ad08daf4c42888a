"""``@task``: give a function its defaults without wrapping it.

The decorator returns the very function it was given, with its options
attached, so the function keeps its module-level name and pickles by
reference into the process pool (a wrapper would not: the seed's pitfall).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from poolfleet.common.protocol import Kind

F = TypeVar("F", bound=Callable[..., Any])
ATTR = "__poolfleet_task__"


@dataclass(frozen=True)
class TaskOptions:
    """Defaults of a task; a submit may override each of them."""

    kind: Kind = Kind.CPU
    timeout_s: float | None = None
    retries: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "timeout_s": self.timeout_s, "retries": self.retries}


@overload
def task(fn: F, /) -> F: ...
@overload
def task(*, kind: str = "cpu", timeout_s: float | None = None, retries: int = 0) -> Callable[[F], F]: ...


def task(
    fn: F | None = None,
    /,
    *,
    kind: str = "cpu",
    timeout_s: float | None = None,
    retries: int = 0,
) -> F | Callable[[F], F]:
    """Mark a module-level function as a task with defaults.

    ``kind`` is ``"cpu"`` (process pool) or ``"io"`` (thread pool);
    ``timeout_s`` and ``retries`` are defaults a submit can override.
    """
    try:
        kind_value = Kind(kind)
    except ValueError:
        raise ValueError(f"kind must be 'cpu' or 'io', not {kind!r}") from None
    if kind_value is Kind.CMD:
        raise ValueError("kind 'cmd' is for external programs; use ptask run or Client.run")
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError("timeout_s must be positive")
    if retries < 0:
        raise ValueError("retries must not be negative")
    options = TaskOptions(kind_value, float(timeout_s) if timeout_s else None, retries)

    def mark(f: F) -> F:
        setattr(f, ATTR, options)
        return f

    return mark(fn) if fn is not None else mark


def options_of(fn: Callable[..., Any]) -> TaskOptions:
    """The options set by ``@task``, or the defaults for a plain function."""
    opts = getattr(fn, ATTR, None)
    return opts if isinstance(opts, TaskOptions) else TaskOptions()

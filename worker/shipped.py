"""Shipped functions where tasks run: unpickled once per process and function, kept bounded.

The worker's main loop fetches a shipped function's pickle from the master (by hash) and
passes it with each call; the process that runs the call (a pool child for kind cpu, the
worker itself for kind io) unpickles it on first use and keeps it, least recently used
dropped first. A task names its function ``poolfleet.shipped.h<hash>:<label>`` (see
poolfleet.common.shipping); only a function passed in with a call is ever found.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from poolfleet.common.shipping import shipped_digest

#: Unpickled functions kept per process.
MAX_FUNCTIONS = 64

#: (hash, pickle) of a shipped function, as a call carries it.
Code = tuple[bytes, bytes]

_functions: OrderedDict[bytes, Callable[..., Any]] = OrderedDict()
_lock = threading.Lock()


class NotShipped(LookupError):
    """The name is a shipped function's, but none came with the call."""


def install(code: Code) -> None:
    """Make the function of ``code`` known to :func:`function` in this process."""
    digest, blob = code
    with _lock:
        if digest in _functions:
            _functions.move_to_end(digest)
            return
    import cloudpickle  # the reconstructors cloudpickle's pickles name live there

    fn = cloudpickle.loads(blob)
    if not callable(fn):
        raise TypeError(f"the shipped object is a {type(fn).__name__}, not a function")
    with _lock:
        _functions[digest] = fn
        while len(_functions) > MAX_FUNCTIONS:
            _functions.popitem(last=False)


def function(name: str) -> Callable[..., Any]:
    """The shipped function a task name holds the hash of."""
    digest = shipped_digest(name)
    with _lock:
        fn = _functions.get(digest) if digest is not None else None
    if fn is None:
        raise NotShipped(
            f"{name!r} is a shipped function and none came with the task: this worker does not run "
            "shipped code (start it with --run-shipped-code; docs/SECURITY.md)"
        )
    return fn

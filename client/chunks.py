"""Chunks: many calls of one function sent and run as one task, as multiprocessing does.

A chunk is a call of the built-in ``poolfleet.worker.builtins:starmap_chunk``
with the function's task name and a list of argument lists; the worker looks
the name up in its task registry (it runs only tasks it offers) and returns
the list of results. The chunk task takes the function's kind, so an io
function's chunks run on io slots.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from poolfleet.common.protocol import Kind

if TYPE_CHECKING:
    from poolfleet.client.client import TaskOptions

#: The built-in tasks that run a chunk (``CHUNK_TASK_NAME`` and ``MAP_CHUNK_TASK_NAME`` of
#: ``poolfleet.worker.builtins``): calls with argument tuples, calls with one argument.
CHUNK_TASK_NAME = "poolfleet.worker.builtins:starmap_chunk"
MAP_CHUNK_TASK_NAME = "poolfleet.worker.builtins:map_chunk"
#: The attribute ``@task`` sets on a function (``poolfleet.worker.decorator.ATTR``).
TASK_ATTR = "__poolfleet_task__"


def default_chunksize(n_items: int, processes: int) -> int:
    """multiprocessing.Pool.map's chunk size for ``n_items`` over ``processes``: about 4 chunks each."""
    if n_items == 0:
        return 0
    size, extra = divmod(n_items, processes * 4)
    return size + 1 if extra else size


def chunked(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of ``size`` items (the last one shorter), read as they are asked for."""
    if isinstance(iterable, list):
        for i in range(0, len(iterable), size):
            yield iterable[i : i + size]
        return
    it = iter(iterable)
    while True:
        part = list(itertools.islice(it, size))
        if not part:
            return
        yield part


def declared(fn: Callable[..., Any] | str) -> Any:
    """The ``@task`` options of ``fn`` if the client can see them (the function, or a name whose
    module this process has imported), else None. Never imports anything."""
    obj: Any = fn
    if isinstance(fn, str):
        module, _, attr = fn.partition(":")
        obj = getattr(sys.modules.get(module), attr, None)
    return getattr(obj, TASK_ATTR, None)


def chunk_options(options: TaskOptions, fn: Callable[..., Any] | str, size: int) -> TaskOptions:
    """Options for chunks of ``size`` calls of ``fn``.

    A chunk takes the function's kind, retries and timeout (its own, as declared with ``@task``
    and seen by the client, unless ``options`` sets them); the timeout, given per call, is
    multiplied by the chunk's size. With nothing declared or set, the master's defaults for
    the chunk task apply (kind cpu, no timeout, no retries).
    """
    decl = declared(fn)
    kind = options.kind
    timeout_s = options.timeout_s
    retries = options.retries
    if decl is not None:
        if kind is None:
            decl_kind = getattr(decl, "kind", None)
            kind = decl_kind.value if isinstance(decl_kind, Kind) else None
        if timeout_s is None:
            timeout_s = getattr(decl, "timeout_s", None)
        if retries is None:
            retries = getattr(decl, "retries", None)
    if timeout_s is not None:
        timeout_s = float(timeout_s) * max(1, size)
    return replace(options, kind=kind, timeout_s=timeout_s, retries=retries)


def flatten(parts: Iterable[list[Any]]) -> list[Any]:
    return [value for part in parts for value in part]

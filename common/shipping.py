"""Shipped code: the names, hashes and versions both ends of a shipped function agree on.

A function the workers cannot import by name (defined in ``__main__``, a lambda, a closure)
may travel pickled (cloudpickle), once per client and function: its tasks carry a name that
holds the SHA-256 of the pickle, ``poolfleet.shipped.h<64 hex digits>:<label>``, and workers
fetch the pickle from the master by that hash. Arguments and results stay msgpack. Only
workers started with ``--run-shipped-code`` offer :data:`SHIPPED_ROUTE`, the name the master
routes every shipped task by.
"""

from __future__ import annotations

import hashlib
import re
import sys

#: The module part of every shipped task name, before the hash.
SHIPPED_PREFIX = "poolfleet.shipped.h"
#: The name a worker that runs shipped code offers; the master routes shipped tasks by it.
SHIPPED_ROUTE = "poolfleet.shipped:code"
#: The default largest pickled function, in bytes (client ``max_code_bytes``, pmaster
#: ``--max-code-bytes``).
DEFAULT_MAX_CODE_BYTES = 1 << 20
DIGEST_BYTES = 32

_NAME = re.compile(r"^poolfleet\.shipped\.h([0-9a-f]{64}):[A-Za-z_][A-Za-z0-9_]*$")


def digest_of(blob: bytes) -> bytes:
    """The content hash a shipped function is known by."""
    return hashlib.sha256(blob).digest()


def shipped_name(digest: bytes, qualname: str) -> str:
    """The task name of a shipped function: its hash, and a label made of its qualname."""
    label = re.sub(r"\W+", "_", qualname).strip("_") or "function"
    if label[0].isdigit():
        label = "_" + label
    return f"{SHIPPED_PREFIX}{digest.hex()}:{label}"


def is_shipped(name: str) -> bool:
    return name.startswith(SHIPPED_PREFIX)


def shipped_digest(name: str) -> bytes | None:
    """The hash in a shipped task name; None for any other name (or a malformed one)."""
    if not name.startswith(SHIPPED_PREFIX):
        return None
    m = _NAME.match(name)
    return bytes.fromhex(m.group(1)) if m else None


def python_version() -> str:
    """This interpreter's major.minor, which pickled code must match."""
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def cloudpickle_version() -> str | None:
    """The installed cloudpickle's version, or None when it is not installed (read from its
    metadata: nothing here imports a pickle library)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cloudpickle")
    except PackageNotFoundError:
        return None


def skew(python: str, cloudpickle: str, here_python: str, here_cloudpickle: str | None) -> str | None:
    """Why a function pickled by ``python``/``cloudpickle`` cannot run here, or None.

    The Python major.minor must be the same (bytecode and pickled code objects differ between
    them); so must cloudpickle's major version (its reconstructors change between majors).
    """
    theirs = f"Python {python} (cloudpickle {cloudpickle})"
    ours = f"Python {here_python} (cloudpickle {here_cloudpickle or 'not installed'})"
    if python != here_python:
        return (
            f"version skew: the function was pickled by {theirs}, the worker runs {ours}; "
            "run the client and the workers on the same Python major.minor"
        )
    if here_cloudpickle is None or cloudpickle.split(".")[0] != here_cloudpickle.split(".")[0]:
        return (
            f"version skew: the function was pickled by {theirs}, the worker runs {ours}; "
            "install the same cloudpickle major version on both (pip install poolfleet[shipping])"
        )
    return None

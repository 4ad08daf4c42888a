"""ptask's options for tasks that wait: ``--after ID``, ``--delay 90s``, ``--at TIME``, and
task references (``{"$ref": "ID"}``) in the arguments of ``ptask submit``."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Annotated, Any

import typer

from poolfleet.client.client import TaskRef, eta_epoch
from poolfleet.common.errors import PoolfleetError

AfterOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--after",
        metavar="ID",
        help="Start only after this task has succeeded (an id or unique prefix; repeatable).",
    ),
]
DelayOpt = Annotated[
    str | None, typer.Option("--delay", help="Start no sooner than this: 90s, 10m, 2h, 1d (or seconds).")
]
AtOpt = Annotated[
    str | None,
    typer.Option(
        "--at", help="Start no sooner than this time, ISO 8601 with its offset: 2026-12-24T18:00:00+01:00."
    ),
]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
#: The JSON form of a task reference in ptask's arguments.
REF_KEY = "$ref"


def parse_delay(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``10m``, ``2h`` or ``1d``."""
    m = _DURATION.match(text.strip())
    if m is None:
        raise PoolfleetError(f"--delay takes a duration like 90s, 10m, 2h or 1d, not {text!r}")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def parse_at(text: str) -> float:
    """Epoch seconds of an ISO 8601 time with an offset (a time without one is refused)."""
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise PoolfleetError(
            f"--at takes an ISO 8601 time with its offset, like 2026-12-24T18:00:00+01:00, not {text!r}"
        ) from None
    if when.tzinfo is None:
        raise PoolfleetError(
            f"--at {text} has no UTC offset: add one (+01:00, Z) so the time is not ambiguous"
        )
    return eta_epoch(when)


def with_refs(value: Any, resolve: Callable[[str], str]) -> Any:
    """``value`` with each ``{"$ref": "ID"}`` map (at any depth) turned into a task reference."""
    if isinstance(value, dict):
        if len(value) == 1 and REF_KEY in value:
            target = value[REF_KEY]
            if not isinstance(target, str):
                raise PoolfleetError(f'{{"{REF_KEY}": ...}} takes a task id as a string, not {target!r}')
            return TaskRef(resolve(target))
        return {k: with_refs(v, resolve) for k, v in value.items()}
    if isinstance(value, list):
        return [with_refs(v, resolve) for v in value]
    return value


def later_options(delay: str | None, at: str | None) -> dict[str, Any]:
    """TaskOptions fields for --delay and --at (PoolfleetError for a bad one: check before
    connecting, bad usage is bad whether a master runs or not)."""
    out: dict[str, Any] = {}
    if delay is not None:
        out["delay_s"] = parse_delay(delay)
    if at is not None:
        out["eta"] = parse_at(at)
    return out


def after_option(after: list[str] | None, resolve: Callable[[list[str]], list[str]]) -> dict[str, Any]:
    """The TaskOptions field for --after (ids and prefixes resolved by the master)."""
    return {"after": tuple(TaskRef(t).id_bytes for t in resolve(after))} if after else {}

"""Output helpers for ptask: aligned tables and JSON documents."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

from poolfleet.common.ids import format_id


def jsonable(value: Any) -> Any:
    """Make a decoded msgpack value printable as JSON (bytes become base64 text)."""
    if isinstance(value, bytes):
        return {"$base64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def dumps(doc: Any) -> str:
    return json.dumps(jsonable(doc), sort_keys=False, ensure_ascii=False)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned table (left-aligned text, right-aligned numbers)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(isinstance(r[i], int | float) for r in rows) and bool(rows) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = [
            c.rjust(w) if numeric[i] and n else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def offered_names(worker: dict[str, Any]) -> list[str] | None:
    """The task names a WORKERS entry says the worker offers, or None when it does not say.

    ``offers`` is a list of ``module:function`` names (a map is read by its keys); anything
    else in it is ignored, so an older or newer master never breaks the listing.
    """
    offers = worker.get("offers")
    if isinstance(offers, dict):
        offers = list(offers)
    if not isinstance(offers, list | tuple):
        return None
    return sorted({n for n in offers if isinstance(n, str)})


def offers_lines(workers: Sequence[dict[str, Any]]) -> list[str]:
    """What the workers offer, module by module; workers that offer the same share a block.

    Empty when no entry says what its worker offers.
    """
    groups: dict[tuple[str, ...], list[str]] = {}
    for w in workers:
        names = offered_names(w)
        if names is not None:
            groups.setdefault(tuple(names), []).append(str(w.get("worker_id", "?")))
    lines: list[str] = []
    for offered, ids in groups.items():
        who = ", ".join(ids)
        if not offered:
            lines.append(f"{who}: no tasks")
            continue
        lines.append(f"{who} offer{'s' if len(ids) == 1 else ''}:")
        modules: dict[str, list[str]] = {}
        for n in offered:
            module, _, function = n.partition(":")
            modules.setdefault(module, []).append(function)
        for module, functions in modules.items():
            lines.append(f"  {module}: {', '.join(functions)}")
    return lines


def result_doc(entry: dict[str, Any], value: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": format_id(entry["id"]), "state": entry.get("state")}
    if entry.get("name"):
        doc["name"] = entry["name"]
    if entry.get("state") == "SUCCEEDED":
        doc["result"] = value
    if entry.get("error"):
        doc["error"] = entry["error"]
    for key in ("attempt", "worker_id", "duration_ms"):
        if entry.get(key) is not None:
            doc[key] = entry[key]
    return doc

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

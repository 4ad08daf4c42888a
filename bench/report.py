"""The result table: printed, and written into docs/BENCHMARKS.md between markers."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

BEGIN = "<!-- bench:begin (written by `make bench`; edits inside are overwritten) -->"
END = "<!-- bench:end -->"


@dataclass
class Row:
    workload: str
    poolfleet: str
    yardstick: str
    ratio: str
    target: str
    ok: bool | None


def environment() -> dict[str, str]:
    import msgpack
    import zmq

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(str(p) for p in msgpack.version),
        "sqlite": __import__("sqlite3").sqlite_version,
        "os": f"{platform.system()} {platform.release()}",
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def table(rows: list[Row]) -> str:
    """A Markdown table (also readable as plain text)."""
    head = ["workload", "poolfleet", "yardstick (local)", "ratio", "target", "met"]
    body = [
        [r.workload, r.poolfleet, r.yardstick, r.ratio, r.target, {True: "yes", False: "NO", None: "-"}[r.ok]]
        for r in rows
    ]
    return markdown(head, body)


def markdown(head: list[str], body: list[list[str]]) -> str:
    """A Markdown table with padded columns."""
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(b) for b in body]
    return "\n".join(out)


def section(rows: list[Row], env: dict[str, str], notes: list[str], command: str) -> str:
    lines = [
        BEGIN,
        f"Run `{command}` on {env['date']}: {env['cores']} cores ({env['cpu']}), {env['os']}, "
        f"{env['python']}, pyzmq {env['pyzmq']}, libzmq {env['libzmq']}, msgpack {env['msgpack']}, "
        f"SQLite {env['sqlite']}.",
        "",
        table(rows),
        "",
        *[f"- {n}" for n in notes],
        END,
    ]
    return "\n".join(lines)


def write(path: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the section of ``path`` between ``begin`` and ``end`` (which ``text`` starts and
    ends with) by ``text``; append it where there is none; create the file if needed."""
    if path.exists():
        old = path.read_text()
        if begin in old and end in old:
            before = old[: old.index(begin)]
            after = old[old.index(end) + len(end) :]
            path.write_text(before + text + after)
            return
        path.write_text(old.rstrip("\n") + "\n\n" + text + "\n")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Benchmarks\n\n" + text + "\n")


def command_line() -> str:
    args = " ".join(sys.argv[1:])
    return "make bench" if not args else f"python -m bench {args}"

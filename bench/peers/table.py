"""The peers' table: one row per system, "-" where a system did not run a workload (the reason
in a note), and the section of docs/BENCHMARKS.md it is written into. Pure: no processes."""

from __future__ import annotations

from dataclasses import dataclass

from bench.peers.common import PeerResult
from bench.report import markdown
from bench.stats import spread

BEGIN = "<!-- bench-peers:begin (written by `make bench-peers`; edits inside are overwritten) -->"
END = "<!-- bench-peers:end -->"

# the workloads: result field, column title, digits
COLUMNS = (
    ("noop", "no-op tasks/s", 0),
    ("p50", "round trip p50 ms", 3),
    ("p99", "round trip p99 ms", 3),
    ("cpu", "cpu efficiency", 3),
    ("io", "io efficiency", 3),
)
# a system's name in the table, with its own version from its ``versions``
TITLES = {
    "Ray": "Ray {ray}",
    "Dask distributed": "Dask distributed {distributed}",
    "Celery + Redis": "Celery {celery} + Redis",
    "RQ": "RQ {rq}",
    "poolfleet": "poolfleet {poolfleet}",
}


@dataclass(frozen=True)
class Heading:
    """What the section's first line says about the run."""

    command: str
    date: str
    machine: str
    python: str


def title(res: PeerResult) -> str:
    """The system with its own version, e.g. ``Ray 2.60.0`` (without one where it is unknown)."""
    try:
        return TITLES.get(res.system, res.system).format_map(res.versions)
    except KeyError:
        return res.system


def _cell(res: PeerResult, field: str, digits: int) -> str:
    values: list[float] = getattr(res, field)
    return spread(values, digits) if values else "-"


def rows(results: list[PeerResult]) -> list[list[str]]:
    return [[title(r), *(_cell(r, f, d) for f, _, d in COLUMNS)] for r in results]


def notes(results: list[PeerResult]) -> list[str]:
    """For each system: how it was set up, every version, and why a "-" is there."""
    out = []
    for r in results:
        versions = ", ".join(f"{k} {v}" for k, v in r.versions.items())
        text = f"{title(r)}: {r.setup}" if r.setup else title(r)
        text += f" ({versions})." if versions else "."
        by_reason: dict[str, list[str]] = {}
        for field in (f for f, _, _ in COLUMNS if not getattr(r, f)):
            reason = r.skipped.get(field) or r.skipped.get("all") or "no figure"
            by_reason.setdefault(reason, []).append(field)
        for reason, fields in by_reason.items():
            text += f" {', '.join(fields)}: - ({reason})."
        out.append(text)
    return out


def section(results: list[PeerResult], heading: Heading, extra_notes: list[str]) -> str:
    """The Markdown between BEGIN and END (both included)."""
    head = ["system", *(t for _, t, _ in COLUMNS)]
    lines = [
        BEGIN,
        f"Run `{heading.command}` on {heading.date}: {heading.machine}, {heading.python}.",
        "",
        markdown(head, rows(results)),
        "",
        *[f"- {n}" for n in [*notes(results), *extra_notes]],
        END,
    ]
    return "\n".join(lines)


def failed(system: str, reason: str) -> PeerResult:
    """The row of a system that gave no figures at all."""
    return PeerResult(system, skipped={"all": reason})

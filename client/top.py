"""``ptask top``: a live view of the cluster (workers, slots, queues, throughput)."""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from poolfleet.client.cli_ops import _progress_text
from poolfleet.client.client import Client
from poolfleet.client.cliopts import EXIT_UNREACHABLE, UNREACHABLE_HINT, MasterOpt, fail, make_client
from poolfleet.client.output import dumps
from poolfleet.common.errors import PoolfleetError
from poolfleet.common.ids import format_id
from poolfleet.common.protocol import FINAL_STATES

KINDS = ("cpu", "io", "cmd")
#: Running tasks with a progress report shown at most (the newest).
PROGRESS_ROWS = 10


def snapshot(client: Client, timeout_s: float) -> dict[str, Any]:
    """One sample of the cluster from a STATUS and a WORKERS request."""
    st = client.status(timeout_s)
    workers = client.workers(timeout_s)
    slots: dict[str, dict[str, int]] = {}
    for w in workers:
        for kind, total in w["slots"].items():
            s = slots.setdefault(kind, {"busy": 0, "total": 0, "queued": 0})
            held = w["busy"].get(kind, 0)
            s["total"] += total
            s["busy"] += min(held, total)
            s["queued"] += max(0, held - total)
    counts = st["counts"]
    running, _ = client.tasks(states=["RUNNING"], limit=PROGRESS_ROWS * 5, timeout_s=timeout_s)
    reporting = [
        {
            "id": format_id(t["id"]),
            "name": t["name"],
            "worker_id": t.get("worker_id"),
            "progress": t["progress"],
        }
        for t in running
        if t.get("progress")
    ][:PROGRESS_ROWS]
    return {
        "master": client.master,
        "master_id": st.get("master_id"),
        "uptime_s": st.get("uptime_s"),
        "at": time.time(),
        "counts": counts,
        "submitted_total": st.get("submitted_total", 0),
        "finished_total": sum(n for s, n in counts.items() if s in FINAL_STATES),
        "queues": st["queues"],
        "slots": {k: slots[k] for k in sorted(slots, key=_kind_order)},
        "workers": workers,
        "progress": reporting,
    }


def _kind_order(kind: str) -> tuple[int, str]:
    return (KINDS.index(kind) if kind in KINDS else len(KINDS), kind)


def with_rates(prev: dict[str, Any] | None, cur: dict[str, Any]) -> dict[str, Any]:
    """Throughput from the deltas of finished and submitted counts between two samples."""
    rates: dict[str, float | None] = {"finished_per_s": None, "submitted_per_s": None}
    if prev is not None and prev.get("master_id") == cur.get("master_id"):
        dt = cur["at"] - prev["at"]
        if dt > 0:
            for key, total in (("finished_per_s", "finished_total"), ("submitted_per_s", "submitted_total")):
                # finished counts can drop when old results expire: never report a negative rate
                rates[key] = round(max(0, cur[total] - prev[total]) / dt, 1)
    return cur | rates


def _fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}/s"


def render(snap: dict[str, Any] | None, error: str | None = None) -> RenderableType:
    """The frame: a header line, then slots, queues and workers as aligned tables."""
    if snap is None:
        return Text(f"ptask top: {error or 'waiting for the master'}  (q quits)", style="bold red")
    counts = snap["counts"]
    header = Text.assemble(
        ("poolfleet ", "bold"),
        f"{snap['master']}  up {snap['uptime_s']:.0f}s  workers {len(snap['workers'])}  ",
        ("done ", "dim"),
        f"{_fmt_rate(snap.get('finished_per_s'))}  ",
        ("submitted ", "dim"),
        f"{_fmt_rate(snap.get('submitted_per_s'))}  ",
        ("pending ", "dim"),
        f"{counts.get('PENDING', 0)}  ",
        ("running ", "dim"),
        f"{counts.get('RUNNING', 0)}  ",
        ("failed ", "dim"),
        f"{counts.get('FAILED', 0) + counts.get('TIMED_OUT', 0)}",
    )
    if error:
        header.append(f"  ({error})", style="red")
    slots = Table(box=box.SIMPLE_HEAD, title="slots", title_justify="left", pad_edge=False)
    for col in ("kind", "busy", "total", "queued on workers"):
        slots.add_column(col, justify="left" if col == "kind" else "right")
    for kind, s in snap["slots"].items():
        slots.add_row(kind, str(s["busy"]), str(s["total"]), str(s["queued"]))
    queues = Table(box=box.SIMPLE_HEAD, title="queues", title_justify="left", pad_edge=False)
    for col in ("queue", "kind", "pending"):
        queues.add_column(col, justify="right" if col == "pending" else "left")
    for q in snap["queues"]:
        queues.add_row(q["queue"], q["kind"], str(q["depth"]))
    if not snap["queues"]:
        queues.add_row("-", "-", "0")
    workers = Table(box=box.SIMPLE_HEAD, title="workers", title_justify="left", pad_edge=False)
    for col in ("worker", "host", "pid", "queues", "busy/slots", "heartbeat"):
        workers.add_column(col, justify="right" if col == "pid" else "left")
    for w in snap["workers"]:
        busy = " ".join(
            f"{k}:{w['busy'].get(k, 0)}/{n}"
            for k, n in sorted(w["slots"].items(), key=lambda i: _kind_order(i[0]))
        )
        workers.add_row(
            w["worker_id"],
            w["host"],
            str(w["pid"]),
            ",".join(w["queues"]),
            busy,
            f"{w['last_heartbeat_s']:.1f}s ago" + (" draining" if w.get("draining") else ""),
        )
    footer = Text("q or Ctrl-C quits", style="dim")
    parts: list[RenderableType] = [header, slots, queues, workers]
    if snap.get("progress"):
        progress = Table(box=box.SIMPLE_HEAD, title="progress", title_justify="left", pad_edge=False)
        for col in ("task", "name", "worker", "progress"):
            progress.add_column(col)
        for t in snap["progress"]:
            progress.add_row(t["id"], t["name"], t.get("worker_id") or "", _progress_text(t["progress"]))
        parts.append(progress)
    return Group(*parts, footer)


class Keys:
    """Single keys from a terminal in cbreak mode, or just a clock when stdin is not one."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None

    @contextmanager
    def cbreak(self) -> Iterator[None]:
        if self.fd is None:
            yield
            return
        saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)
        try:
            yield
        finally:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)

    def wait(self, seconds: float) -> str:
        """Wait up to ``seconds`` for key presses; return what was typed (maybe nothing)."""
        if self.fd is None:
            time.sleep(seconds)
            return ""
        ready, _, _ = select.select([self.fd], [], [], seconds)
        if not ready:
            return ""
        data = os.read(self.fd, 64)
        return data.decode(errors="replace") if data else "q"  # end of input quits too


def top_command(
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes.")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for each answer.")] = 5.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document of the snapshot and exit.")
    ] = False,
    master: MasterOpt = None,
) -> None:
    """Live view of workers, slots busy by kind, queue depths and throughput; q or Ctrl-C quits.

    Throughput is measured between two samples, so --once and --json take one interval.
    When standard output is not a terminal, top prints one frame, as with --once.
    """
    client = make_client(master, timeout)
    try:
        try:
            first = snapshot(client, timeout)
            if once or as_json or not sys.stdout.isatty():
                _print_once(client, first, interval, timeout, as_json)
                return
        except PoolfleetError as exc:
            fail(str(exc), EXIT_UNREACHABLE, UNREACHABLE_HINT)
        _live(client, first, interval, timeout)
    finally:
        client.close()


def _print_once(
    client: Client, first: dict[str, Any], interval: float, timeout: float, as_json: bool
) -> None:
    time.sleep(interval)  # throughput needs a second sample
    snap = with_rates(first, snapshot(client, timeout))
    if as_json:
        typer.echo(dumps(snap))
    else:
        Console(width=None if sys.stdout.isatty() else 160).print(render(snap))


def _live(client: Client, first: dict[str, Any], interval: float, timeout: float) -> None:
    keys = Keys()
    console = Console()
    snap = with_rates(None, first)
    try:
        with keys.cbreak(), Live(render(snap), console=console, auto_refresh=False, transient=False) as live:
            live.refresh()
            next_at = time.monotonic() + interval
            while True:
                typed = keys.wait(max(0.0, next_at - time.monotonic()))
                if "q" in typed.lower():
                    return
                if time.monotonic() < next_at:
                    continue
                next_at = time.monotonic() + interval
                error = None
                try:
                    snap = with_rates(snap, snapshot(client, timeout))
                except PoolfleetError as exc:
                    error = str(exc)
                live.update(render(snap, error), refresh=True)
    except KeyboardInterrupt:
        return

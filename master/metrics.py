"""Prometheus metrics for pmaster (``--metrics HOST:PORT``).

The master loop owns every piece of state. It records finished tasks here
(:meth:`MetricsServer.observe`, called from ``Master.finish``) and, at most
every :data:`PUBLISH_INTERVAL_S`, renders the whole exposition text and
publishes it as one immutable string (:meth:`MetricsServer.publish`). The HTTP
thread only ever reads that string, so it never touches the master's state.

The text format is rendered here, without a client library.
"""

from __future__ import annotations

import bisect
import re
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import structlog

from poolfleet.common.errors import ConfigError
from poolfleet.common.protocol import FINAL_STATES, Kind

if TYPE_CHECKING:
    from poolfleet.master.server import Master

log = structlog.get_logger("pmaster")

PUBLISH_INTERVAL_S = 0.5
#: Upper bounds (seconds) of the task duration histogram buckets.
DURATION_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_HOSTPORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_]*):(?P<port>\d{1,5})$")


def parse_listen(text: str, what: str = "metrics", example: str = "127.0.0.1:9464") -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:9100`` for IPv6, ``:9100`` for every address)."""
    m = _HOSTPORT.match(text.strip())
    if not m or int(m.group("port")) > 65535:
        raise ConfigError(f"malformed {what} address {text!r}: expected HOST:PORT, for example {example}")
    return m.group("host").strip("[]"), int(m.group("port"))


class _Histogram:
    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(DURATION_BUCKETS_S) + 1)  # the last one is +Inf
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(DURATION_BUCKETS_S, seconds)] += 1
        self.count += 1
        self.total += seconds


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _num(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value == float("inf"):
        return "+Inf"
    return repr(float(value))


class MetricsRecorder:
    """Counters and histograms, touched only by the master loop's thread."""

    def __init__(self) -> None:
        self.finished: dict[str, int] = {s.value: 0 for s in sorted(FINAL_STATES)}
        self.durations: dict[str, _Histogram] = {}
        self.queues_seen: set[tuple[str, str]] = set()
        self.paused_seen: set[str] = set()
        self.kinds_seen: set[str] = set()

    def observe(self, task_name: str, state: str, duration_ms: float | None) -> None:
        self.finished[state] = self.finished.get(state, 0) + 1
        if duration_ms is not None and duration_ms >= 0:
            self.durations.setdefault(task_name, _Histogram()).observe(duration_ms / 1000.0)

    def render(self, master: Master) -> str:
        """The exposition text for the master's current state (call on the master's thread)."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for sample, labels, value in samples:
                out.append(f"{sample}{labels} {_num(value)}")

        family(
            "poolfleet_tasks_submitted_total",
            "counter",
            "Tasks accepted by this master since it started.",
            [("poolfleet_tasks_submitted_total", "", master.submitted_total)],
        )
        family(
            "poolfleet_tasks_finished_total",
            "counter",
            "Tasks that reached a final state since this master started, by state.",
            [
                ("poolfleet_tasks_finished_total", _labels(state=s), n)
                for s, n in sorted(self.finished.items())
            ],
        )
        depths = {(q, k.value): n for (q, k), n in master.scheduler.depths().items()}
        self.queues_seen.update(depths)
        family(
            "poolfleet_queue_depth",
            "gauge",
            "Pending tasks by queue and kind.",
            [
                ("poolfleet_queue_depth", _labels(queue=q, kind=k), depths.get((q, k), 0))
                for q, k in sorted(self.queues_seen)
            ],
        )
        workers = list(master.registry.workers.values())
        family(
            "poolfleet_workers_connected",
            "gauge",
            "Workers currently registered with the master.",
            [("poolfleet_workers_connected", "", len(workers))],
        )
        total: dict[str, int] = {}
        busy: dict[str, int] = {}
        running = 0
        for w in workers:
            running += len(w.inflight)
            for kind, n in w.slots.items():
                total[kind.value] = total.get(kind.value, 0) + n
                busy[kind.value] = busy.get(kind.value, 0) + min(n, w.busy.get(kind, 0))
        self.kinds_seen.update(total)
        kinds = sorted(self.kinds_seen | {k.value for k in Kind})
        family(
            "poolfleet_slots",
            "gauge",
            "Slots of the connected workers by kind.",
            [("poolfleet_slots", _labels(kind=k), total.get(k, 0)) for k in kinds],
        )
        family(
            "poolfleet_slots_busy",
            "gauge",
            "Slots running a task, by kind.",
            [("poolfleet_slots_busy", _labels(kind=k), busy.get(k, 0)) for k in kinds],
        )
        family(
            "poolfleet_tasks_running",
            "gauge",
            "Tasks dispatched to workers and not yet finished.",
            [("poolfleet_tasks_running", "", running)],
        )
        core = master.core
        family(
            "poolfleet_tasks_held",
            "gauge",
            "Tasks the master holds back: WAITING for other tasks, DELAYED until their time.",
            [
                ("poolfleet_tasks_held", _labels(state="WAITING"), len(core.waits)),
                ("poolfleet_tasks_held", _labels(state="DELAYED"), core.delayed_n),
            ],
        )
        self._operations(master, family)
        samples: list[tuple[str, str, float]] = []
        for name, h in sorted(self.durations.items()):
            cumulative = 0
            for bound, n in zip((*DURATION_BUCKETS_S, float("inf")), h.buckets, strict=True):
                cumulative += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                samples.append(
                    ("poolfleet_task_duration_seconds_bucket", _labels(task=name, le=le), cumulative)
                )
            samples.append(("poolfleet_task_duration_seconds_sum", _labels(task=name), h.total))
            samples.append(("poolfleet_task_duration_seconds_count", _labels(task=name), h.count))
        family(
            "poolfleet_task_duration_seconds",
            "histogram",
            "Run time of finished tasks on the worker, by task name.",
            samples,
        )
        return "\n".join(out) + "\n"

    def _operations(self, master: Master, family: Any) -> None:
        """Paused queues, retries and progress reports (what operators steer and watch)."""
        paused = set(master.scheduler.paused)
        self.paused_seen.update(paused)
        family(
            "poolfleet_queue_paused",
            "gauge",
            "1 for a queue paused with ptask queue pause (nothing of it is dispatched), else 0.",
            [
                ("poolfleet_queue_paused", _labels(queue=q), 1 if q in paused else 0)
                for q in sorted(self.paused_seen)
            ],
        )
        family(
            "poolfleet_queues_paused",
            "gauge",
            "Queues paused now.",
            [("poolfleet_queues_paused", "", len(paused))],
        )
        core = master.core
        counters = core.counters
        family(
            "poolfleet_task_retries_total",
            "counter",
            "Attempts started again after a failure (the task's retries) since this master started.",
            [("poolfleet_task_retries_total", "", counters["task_retries"])],
        )
        family(
            "poolfleet_tasks_retried_total",
            "counter",
            "Final tasks run again as new tasks by request (ptask retry) since this master started.",
            [("poolfleet_tasks_retried_total", "", counters["retried_by_request"])],
        )
        family(
            "poolfleet_tasks_reporting_progress",
            "gauge",
            "Open tasks whose running attempt has reported progress.",
            [("poolfleet_tasks_reporting_progress", "", core.reporting_progress())],
        )
        family(
            "poolfleet_progress_reports_total",
            "counter",
            "Progress reports received from workers since this master started (after their throttle).",
            [("poolfleet_progress_reports_total", "", counters["progress_reports"])],
        )


class MetricsServer:
    """The /metrics endpoint; ``publish`` and ``observe`` are for the master's thread only."""

    def __init__(self, master: Master, host: str, port: int) -> None:
        self.master = master
        self.recorder = MetricsRecorder()
        self._text = ""
        self._last_publish: float | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "pmaster"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, server._text, CONTENT_TYPE)
                elif path == "/":
                    self._reply(200, "poolfleet master: metrics at /metrics\n", "text/plain; charset=utf-8")
                else:
                    self._reply(404, "not found: try /metrics\n", "text/plain; charset=utf-8")

            def _reply(self, code: int, text: str, ctype: str) -> None:
                body = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        family_v6 = ":" in host
        server_cls = V6Server if family_v6 else ThreadingHTTPServer
        self.httpd = server_cls((host, port), Handler)
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address[:2]
        self.publish(master.clock(), force=True)
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="metrics", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        raw, port = self.address[0], self.address[1]
        host = raw.decode() if isinstance(raw, bytes) else str(raw)
        return f"http://[{host}]:{port}/metrics" if ":" in str(host) else f"http://{host}:{port}/metrics"

    def observe(self, task_name: str, state: str, duration_ms: float | None) -> None:
        self.recorder.observe(task_name, state, duration_ms)

    def publish(self, now: float, force: bool = False) -> None:
        """Render a fresh snapshot if the last one is older than PUBLISH_INTERVAL_S."""
        if not force and self._last_publish is not None and now - self._last_publish < PUBLISH_INTERVAL_S:
            return
        self._last_publish = now
        self._text = self.recorder.render(self.master)  # one reference swap: atomic for readers

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


class V6Server(ThreadingHTTPServer):
    import socket as _socket

    address_family = _socket.AF_INET6


def start_metrics_server(master: Master, listen: str) -> MetricsServer:
    """Serve Prometheus metrics on ``HOST:PORT``; exits the daemon with a clear error if it cannot."""
    try:
        host, port = parse_listen(listen)
        server = MetricsServer(master, host, port)
    except ConfigError as exc:
        log.error("metrics_failed", address=listen, error=str(exc))
        raise SystemExit(f"pmaster: error: {exc}") from None
    except OSError as exc:
        log.error("metrics_failed", address=listen, error=str(exc))
        raise SystemExit(
            f"pmaster: error: cannot serve metrics on {listen}: {exc.strerror or exc}; "
            "pick another --metrics HOST:PORT"
        ) from None
    log.info("metrics_started", url=server.url)
    return server

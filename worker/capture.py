"""What a task writes and how far it has got: per-task capture of output and progress.

While a task runs in a pool child or an io thread, ``sys.stdout``, ``sys.stderr`` and a
``logging`` handler on the root logger also write into that task's :class:`TaskCapture` (the
worker's own streams get the text as before), found through a context variable (each io thread runs its own task, so each sees its own). Output
is one text in the order it was written, counted in characters; the capture keeps the last
``limit`` of them. ``progress(fraction, message)`` stores the task's latest report.

Live updates: a capture hands out what is new since its last update (``take_update``), at
most every ``UPDATE_INTERVAL_S``; the worker's main loop takes them for io tasks, and a
small thread in each pool child (started at its first output or report) sends them to the
worker through the child's notice pipe. The final tail goes with the task's result.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TextIO

#: Characters of output a worker keeps per task by default (pworker --max-task-output).
DEFAULT_MAX_OUTPUT = 65536
#: A running task's output and progress go to the master at most this often.
UPDATE_INTERVAL_S = 0.2
#: A progress message is cut to this many characters.
MAX_MESSAGE = 200

#: The capture of the task this thread (or pool child) runs now.
current_capture: ContextVar[TaskCapture | None] = ContextVar("poolfleet_capture", default=None)


class TaskCapture:
    """One attempt's output (its last ``limit`` characters) and its latest progress report."""

    __slots__ = (
        "_kept",
        "_last_update",
        "_lock",
        "_parts",
        "_progress_sent",
        "_sent",
        "attempt",
        "closed",
        "end",
        "limit",
        "on_dirty",
        "progress",
        "task_id",
    )

    #: made at the first write (most tasks write nothing: no lock for them); only the task's
    #: own thread writes, so it exists before ``end`` moves and before anyone else needs it
    _lock: threading.Lock | None

    def __init__(
        self, task_id: bytes, attempt: int, limit: int, on_dirty: Callable[[], None] | None = None
    ) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self.limit = max(0, limit)
        self._parts: list[str] = []
        self._kept = 0
        self.end = 0  # characters written in all (the offset at the end of the output)
        self._sent = 0  # offset up to which output went out in updates
        self.progress: tuple[float, str, float] | None = None
        self._progress_sent: tuple[float, str, float] | None = None
        self._last_update = 0.0
        self._lock = None
        self.closed = False
        #: called at the first output or report (a pool child starts its sender then)
        self.on_dirty = on_dirty

    def write(self, text: str) -> None:
        if not text:
            return
        if self._lock is None:
            self._lock = threading.Lock()
        with self._lock:
            self._parts.append(text)
            self._kept += len(text)
            self.end += len(text)
            if self._kept > 2 * self.limit + 4096:
                self._compact()
        if self.on_dirty is not None:
            self.on_dirty()

    def report(self, fraction: float, message: str) -> None:
        self.progress = (min(1.0, max(0.0, fraction)), message[:MAX_MESSAGE], time.time())
        if self.on_dirty is not None:
            self.on_dirty()

    def _compact(self) -> str:
        text = "".join(self._parts)
        if len(text) > self.limit:
            text = text[len(text) - self.limit :] if self.limit else ""
        self._parts = [text] if text else []
        self._kept = len(text)
        return text

    def tail(self) -> str:
        if self._lock is None:
            return ""
        with self._lock:
            return self._compact()

    def take_update(self, now: float, force: bool = False) -> dict[str, Any] | None:
        """What is new since the last update (``{output, at}`` and/or ``progress``), or None:
        nothing new, or the last update is less than UPDATE_INTERVAL_S old."""
        if not force and now - self._last_update < UPDATE_INTERVAL_S:
            return None
        progress = self.progress
        if self.end == self._sent and progress is self._progress_sent:
            return None
        update: dict[str, Any] = {}
        if self.end > self._sent and self._lock is not None:
            with self._lock:
                text = self._compact()
                start = self.end - len(text)
                at = max(self._sent, start)
                update["output"] = text[at - start :]
                update["at"] = at
                self._sent = self.end
        if progress is not None and progress is not self._progress_sent:
            update["progress"] = progress_wire(progress)
            self._progress_sent = progress
        self._last_update = now
        return update or None

    def final(self) -> dict[str, Any] | None:
        """The result's fields: ``output`` (the kept tail), ``output_end``, ``progress``."""
        self.closed = True
        out: dict[str, Any] = {}
        if self.end:
            out["output"] = self.tail()
            out["output_end"] = self.end
        if self.progress is not None:
            out["progress"] = progress_wire(self.progress)
        return out or None


def progress_wire(p: tuple[float, str, float]) -> dict[str, Any]:
    return {"fraction": p[0], "message": p[1], "at": p[2]}


def progress(fraction: float, message: str = "") -> None:
    """Report how far the running task has got: ``progress(0.4, "resized 40 of 100")``.

    ``fraction`` is clamped to 0 … 1; ``message`` is cut to 200 characters. Cheap enough for a
    tight loop: only the latest report is kept, and the worker sends it on at most five times
    a second (the last one always, with the result). Outside a task it does nothing.
    """
    cap = current_capture.get()
    if cap is not None:
        cap.report(float(fraction), str(message))


class _Routed:
    """A stand-in for ``sys.stdout``/``sys.stderr``: a running task's writes also go to its
    capture; everything still reaches the original stream (the worker's own output, as before)."""

    def __init__(self, original: TextIO) -> None:
        self._original = original

    def write(self, text: str) -> int:
        cap = current_capture.get()
        if cap is not None:
            cap.write(text)
        return self._original.write(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


class _CaptureHandler(logging.Handler):
    """Log records made while a task runs go into its capture; those of level WARNING and above
    also to the original stderr, as Python's last-resort handler would have."""

    def __init__(self, stderr: TextIO) -> None:
        super().__init__()
        self._stderr = stderr

    def emit(self, record: logging.LogRecord) -> None:
        cap = current_capture.get()
        try:
            if cap is not None:
                cap.write(self.format(record) + "\n")
            if record.levelno >= logging.WARNING:
                self._stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never fail the task
            self.handleError(record)


_installed = False


def install() -> None:
    """Route this process's stdout, stderr and logging through the captures (once)."""
    global _installed
    if _installed:
        return
    _installed = True
    stderr = sys.stderr
    sys.stdout = _Routed(sys.stdout)
    sys.stderr = _Routed(stderr)
    handler = _CaptureHandler(stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)  # a task's logging.info() is captured, as a script's prints


class ChildSender:
    """In a pool child: sends the running task's updates to the worker, from a thread of its
    own started at the task's first output or report."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        self._send = send
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.capture: TaskCapture | None = None

    def dirty(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="pf-output", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(UPDATE_INTERVAL_S)
            cap = self.capture
            if cap is None or cap.closed:
                continue
            update = cap.take_update(time.monotonic())
            if update is not None:
                for piece in split_update(update):
                    self._send(("u", cap.task_id, cap.attempt, piece))


#: Output characters per notice: a notice must stay one atomic pipe write (PIPE_BUF 4096 bytes).
NOTICE_CHARS = 900
#: Output characters one update of a pool child sends at most (older new text is skipped).
MAX_NOTICE_OUTPUT = 32 * NOTICE_CHARS


def split_update(update: dict[str, Any]) -> list[dict[str, Any]]:
    """An update in pieces small enough for one atomic pipe write each."""
    text = update.get("output")
    if text is None:
        return [update]
    at = update["at"]
    if len(text) > MAX_NOTICE_OUTPUT:
        at += len(text) - MAX_NOTICE_OUTPUT
        text = text[-MAX_NOTICE_OUTPUT:]
    pieces: list[dict[str, Any]] = []
    for i in range(0, len(text), NOTICE_CHARS):
        pieces.append({"output": text[i : i + NOTICE_CHARS], "at": at + i})
    if "progress" in update:
        pieces[-1]["progress"] = update["progress"]
    return pieces

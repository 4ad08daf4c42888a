"""kind=cmd: run an allowed external program in its own process group."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

from poolfleet.common import codec
from poolfleet.common.errors import DecodeError
from poolfleet.common.protocol import TaskState
from poolfleet.worker.cmdpolicy import check_env
from poolfleet.worker.runner import Outcome, decode_call, error_map

MAX_OUTPUT_BYTES = 16 * 1024 * 1024


class CommandNotAllowed(PermissionError):
    """The worker does not allow this program."""


def resolve_program(program: str, allowed: frozenset[str]) -> str:
    """Return the path to run, or raise CommandNotAllowed naming the program."""
    if not allowed:
        raise CommandNotAllowed("cmd tasks are disabled on this worker; start it with --allow-cmd PROGRAM")
    if program in allowed:
        found = shutil.which(program)
        if found is None:
            raise FileNotFoundError(f"program {program!r} not found on the worker's PATH")
        return found
    raise CommandNotAllowed(
        f"program {program!r} is not allowed on this worker (allowed: {', '.join(sorted(allowed))})"
    )


def parse_spec(payload: bytes) -> dict[str, Any]:
    args, kwargs = decode_call(payload)
    names = ("argv", "stdin", "env", "cwd")
    spec: dict[str, Any] = dict(zip(names, args, strict=False))
    spec.update(kwargs)
    argv = spec.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise DecodeError("cmd task needs argv: a non-empty list of strings")
    if spec.get("stdin") is not None and not isinstance(spec["stdin"], str | bytes):
        raise DecodeError("cmd task stdin must be a string")
    env = spec.get("env")
    if env is not None and not (
        isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        raise DecodeError("cmd task env must map strings to strings")
    if spec.get("cwd") is not None and not isinstance(spec["cwd"], str):
        raise DecodeError("cmd task cwd must be a string")
    return spec


def _text(data: bytes) -> str:
    if len(data) > MAX_OUTPUT_BYTES:
        data = data[:MAX_OUTPUT_BYTES]
    return data.decode("utf-8", errors="replace")


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill the program and everything it started (its process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_command(
    payload: bytes,
    allowed: frozenset[str],
    base_env: dict[str, str],
    timeout_s: float | None,
    on_start: Callable[[subprocess.Popen[bytes]], bool],
    allowed_env: frozenset[str] = frozenset(),
) -> Outcome:
    """Run the program; ``on_start`` registers it for cancel and returns False if already cancelled.

    The task's ``env`` may not set variables that change how a program is loaded or
    interpreted unless ``allowed_env`` names them (see poolfleet.worker.cmdpolicy).
    """
    start = time.perf_counter()
    try:
        spec = parse_spec(payload)
        path = resolve_program(spec["argv"][0], allowed)
        check_env(spec.get("env"), allowed_env)
        env = dict(base_env)
        env.update(spec.get("env") or {})
        stdin = spec.get("stdin")
        data = stdin.encode() if isinstance(stdin, str) else stdin
        proc = subprocess.Popen(
            [path, *spec["argv"][1:]],
            stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=spec.get("cwd"),
            start_new_session=True,
        )
    except Exception as exc:  # noqa: BLE001 - reported as the task's failure
        return (TaskState.FAILED.value, None, error_map(exc), (time.perf_counter() - start) * 1000, None)
    if not on_start(proc):
        kill_group(proc)
    try:
        out, err = proc.communicate(data, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.communicate()
        msg = f"program ran longer than {timeout_s} s; its process group was killed"
        return (
            TaskState.TIMED_OUT.value,
            None,
            {"type": "TimeoutError", "message": msg, "traceback": ""},
            (time.perf_counter() - start) * 1000,
            None,
        )
    value = {"exit_code": proc.returncode, "stdout": _text(out), "stderr": _text(err)}
    return (TaskState.SUCCEEDED.value, codec.pack(value), None, (time.perf_counter() - start) * 1000, None)

"""``make demo``: a master and two workers on loopback, a mixed batch of tasks through ptask.

1. ``ptask local --workers 2`` starts pmaster and two pworkers (free loopback
   ports, a temporary journal) with the demo task module and ``echo`` allowed;
2. ``ptask submit`` and ``ptask run`` send cpu, io and cmd tasks, and
   ``ptask result --wait`` collects them; ``ptask map`` runs a small batch;
3. everything ``ptask local`` started is stopped (SIGTERM, then it waits).

Run it with the project's virtual environment's bin directory on PATH.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
READY_TIMEOUT_S = 120.0


def ptask_argv() -> list[str]:
    exe = shutil.which("ptask")
    if exe is None:
        sys.exit("demo: error: ptask is not on PATH (hint: run 'make demo', which installs it into .venv)")
    return [exe]


def read_banner(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The JSON document ptask local prints once the master and workers are up."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if sel.select(0.5):
            line = proc.stdout.readline()
            if not line:
                break
            doc: dict[str, Any] = json.loads(line)
            return doc
        if proc.poll() is not None:
            break
    raise RuntimeError(f"ptask local did not come up (exit status {proc.poll()})")


def ptask(*args: str, env: dict[str, str], stdin: str | None = None) -> str:
    r = subprocess.run(
        [*ptask_argv(), *args], env=env, input=stdin, capture_output=True, text=True, timeout=120
    )
    if r.returncode != 0:
        raise RuntimeError(f"'ptask {' '.join(args)}' failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def show(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def run_batch(env: dict[str, str]) -> None:
    batch: list[tuple[str, str, list[str]]] = [
        ("cpu", "count_primes(30000)", ["submit", "demo_tasks:count_primes", "30000"]),
        ("cpu", "count_primes(60000)", ["submit", "demo_tasks:count_primes", "60000"]),
        ("io", "fetch(https://example.org/a)", ["submit", "demo_tasks:fetch", "https://example.org/a"]),
        ("io", "fetch(https://example.org/b)", ["submit", "demo_tasks:fetch", "https://example.org/b"]),
        ("cmd", "echo hello from a cmd task", ["run", "--", "echo", "hello", "from", "a", "cmd", "task"]),
        ("cmd", "echo poolfleet", ["run", "--", "echo", "poolfleet"]),
    ]
    print(f"\n$ ptask submit / ptask run: {len(batch)} tasks (2 cpu, 2 io, 2 cmd)")
    ids = [(kind, call, ptask(*argv, env=env).strip()) for kind, call, argv in batch]
    print("$ ptask result ID --wait --json   (for each of them, side by side)")
    waits = [
        subprocess.Popen(
            [*ptask_argv(), "result", task_id, "--wait", "--json"], env=env, stdout=subprocess.PIPE, text=True
        )
        for _, _, task_id in ids
    ]
    rows = []
    for (kind, call, task_id), proc in zip(ids, waits, strict=True):
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"'ptask result {task_id} --wait' failed ({proc.returncode})")
        doc = json.loads(out)
        value = doc.get("result")
        if kind == "cmd" and isinstance(value, dict):
            value = value.get("stdout", "").strip()
        rows.append([kind, call, doc["state"], json.dumps(value), doc.get("worker_id", "")])
    print()
    show(rows, ["kind", "task", "state", "result", "worker"])

    lines = "".join(json.dumps([n]) + "\n" for n in (1000, 2000, 5000, 10000, 20000))
    print("\n$ ptask map demo_tasks:count_primes --from -   (5 lines on standard input)")
    out = ptask(
        "map", "demo_tasks:count_primes", "--from", "-", "--no-progress", "--json", env=env, stdin=lines
    )
    docs = [json.loads(line) for line in out.splitlines()]
    results = [d for d in docs if "index" in d]
    show(
        [
            [str(d["index"]), lines.splitlines()[d["index"]], d["state"], json.dumps(d.get("result"))]
            for d in results
        ],
        ["index", "input", "state", "result"],
    )
    summary = docs[-1]["summary"]
    print(
        f"summary: {summary['succeeded']} succeeded, {summary['failed']} failed in {summary['elapsed_s']} s"
    )
    print("\n$ ptask status")
    print(ptask("status", env=env).rstrip())


def main() -> int:
    env = dict(os.environ)
    env.pop("POOLFLEET_MASTER", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    argv = [*ptask_argv(), "local", "--workers", "2", "--tasks", "demo_tasks", "--allow-cmd", "echo"]
    argv += ["--cpu", "2", "--io", "4", "--clients-endpoint", "tcp://127.0.0.1:0"]
    argv += ["--workers-endpoint", "tcp://127.0.0.1:0", "--log-level", "warning", "--json"]
    print("$ ptask local --workers 2 --tasks demo_tasks --allow-cmd echo ...")
    sys.stdout.flush()
    local = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    status = 1
    try:
        banner = read_banner(local)
        env["POOLFLEET_MASTER"] = banner["clients_endpoint"]
        procs = ", ".join(f"{p['name']} (pid {p['pid']})" for p in banner["processes"])
        print(f"up: {procs}; clients connect to {banner['clients_endpoint']}")
        run_batch(env)
        status = 0
    except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
    finally:
        if local.poll() is None:
            local.send_signal(signal.SIGTERM)
        try:
            code = local.wait(90)
        except subprocess.TimeoutExpired:
            local.kill()
            code = local.wait()
            status = 1
        if code != 0:
            print(f"demo: error: ptask local exited with status {code}", file=sys.stderr)
            status = 1
        else:
            print("\nstopped: the master and both workers have exited")
    return status


if __name__ == "__main__":
    sys.exit(main())

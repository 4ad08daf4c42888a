"""``python -m bench.journal_finish``: what the journal's FINISH costs, alone and beside a busy thread.

Two questions about the commit of a drain, where one FINISH a task is the
journal's work:

1. What a FINISH costs with and without each of the two partial indexes it
   writes (``tasks_finished`` for TASKS, ``tasks_expiry`` for the TTL).
2. Whether a commit run by a thread of its own would overlap the master's
   loop: the same FINISH transactions from a second thread while the first
   spins in Python, as a busy loop would, at a few switch intervals.

3. What handing the same operations to another process would cost the loop
   instead: pickling and unpickling 1,000 of them.

Figures go to stdout; nothing here is part of the product.
"""

from __future__ import annotations

import argparse
import pickle
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

from poolfleet.common.ids import new_task_ids
from poolfleet.master.journal import _FINISH, SqliteJournal


def _journal(path: Path, rows: int, drop: tuple[str, ...] = ()) -> list[bytes]:
    j = SqliteJournal(path)
    for name in drop:
        j.db.execute(f"DROP INDEX {name}")
    ids = new_task_ids(rows)
    for k in range(0, rows, 2000):
        for t in ids[k : k + 2000]:
            j.stage_insert(t, "bench:noop", "q", "cpu", b"\x90" * 20, None, None, time.time())
        j.commit()
    j.checkpoint()
    j.close()
    return ids


def _finish(db: sqlite3.Connection, chunk: list[bytes]) -> None:
    now = time.time()
    cur = db.cursor()
    cur.execute("BEGIN IMMEDIATE")
    cur.executemany(_FINISH, [("SUCCEEDED", 1, b"\xc0", None, now, now + 3600, "w", 0.1, t) for t in chunk])
    cur.execute("COMMIT")


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def indexes(tmp: Path, rows: int, finishes: int) -> None:
    for drop in ((), ("tasks_expiry",), ("tasks_finished",), ("tasks_expiry", "tasks_finished")):
        path = tmp / f"idx-{len(drop)}-{'-'.join(drop)}.db"
        ids = _journal(path, rows, drop)
        db = _connect(path)
        t0 = time.perf_counter()
        for k in range(0, finishes, 1000):
            _finish(db, ids[k : k + 1000])
        us = (time.perf_counter() - t0) / finishes * 1e6
        db.close()
        print(f"FINISH without {', '.join(drop) or 'nothing'}: {us:.2f} us")


def beside_a_busy_thread(tmp: Path, rows: int, finishes: int) -> None:
    path = tmp / "threads.db"
    ids = _journal(path, rows)
    db = _connect(path)
    t0 = time.perf_counter()
    for k in range(0, finishes, 1000):
        _finish(db, ids[k : k + 1000])
    print(f"FINISH alone: {(time.perf_counter() - t0) / finishes * 1e6:.2f} us")
    base = finishes
    for interval in (0.005, 0.0001, 0.00002):
        sys.setswitchinterval(interval)
        stop = threading.Event()

        def spin(stop: threading.Event) -> None:
            while not stop.is_set():
                for _ in range(1000):
                    pass

        spinner = threading.Thread(target=spin, args=(stop,))
        spinner.start()
        n = max(2000, finishes // 50)  # a few transactions: at the default interval each row waits
        t0 = time.perf_counter()
        for k in range(base, base + n, 1000):
            _finish(db, ids[k : k + 1000])
        us = (time.perf_counter() - t0) / n * 1e6
        stop.set()
        spinner.join()
        base += n
        print(f"FINISH beside a spinning thread, switch interval {interval * 1000:g} ms: {us:.2f} us")
    sys.setswitchinterval(0.005)
    db.close()


def handing_over(rounds: int = 200) -> None:
    now = time.time()
    ops = [
        (_FINISH, ("SUCCEEDED", 1, b"\xc0", None, now, now + 3600, "w-001", 0.1, t))
        for t in new_task_ids(1000)
    ]
    t0 = time.perf_counter()
    for _ in range(rounds):
        blob = pickle.dumps(ops, protocol=5)
    packed = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(rounds):
        pickle.loads(blob)
    unpacked = time.perf_counter() - t0
    n = rounds * len(ops)
    print(
        f"FINISH operations pickled: {packed / n * 1e6:.2f} us each, unpickled {unpacked / n * 1e6:.2f} us "
        f"({len(blob) / len(ops):.0f} bytes each: the statement's text is pickled once)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--finishes", type=int, default=200_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pf-bench-") as d:
        indexes(Path(d), args.rows, args.finishes)
        beside_a_busy_thread(Path(d), args.rows, min(args.finishes, args.rows // 2))
    handing_over()


if __name__ == "__main__":
    main()

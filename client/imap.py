"""The iterators behind ``Pool.imap`` and ``Pool.imap_unordered``.

A feeder thread reads the input as it goes and submits it, chunk by chunk,
keeping at most ``window`` tasks in flight and at most ``window`` results the
caller has not taken, so an endless generator works and a slow one never
blocks the ``imap`` call. After ``Pool.close()`` only the tasks in flight are
bounded, so that ``join()`` returns once the input is read and run, as in
multiprocessing. An
error raised by the input comes out of ``next()`` where the input failed, as
in multiprocessing. Dropping the iterator, or terminating the pool, stops the
feeder.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from poolfleet.client.client import TaskFuture

if TYPE_CHECKING:
    from poolfleet.client.pool import Pool

#: Tasks an imap keeps in flight, and results it holds that the caller has not taken yet.
WINDOW = 256


class _Feed:
    """State shared by the feeder thread and the iterator (the thread never holds the iterator,
    so dropping the iterator is seen)."""

    def __init__(
        self,
        pool: Pool,
        func: Callable[..., Any] | str,
        iterable: Iterable[Any],
        chunksize: int,
        ordered: bool,
        window: int,
    ) -> None:
        self.pool = pool
        self.func = func
        self.iterable = iterable
        self.chunksize = chunksize
        self.ordered = ordered
        self.window = window
        self.cond = threading.Condition()
        self.futures: dict[int, TaskFuture] = {}
        self.landed: deque[int] = deque()  # indices in completion order (unordered)
        self.error: tuple[int, BaseException] | None = None  # the input's own error, by position
        self.total: int | None = None  # chunks submitted, once the input is exhausted
        self.in_flight = 0
        self.stopped = False
        self.released = False
        self.thread = threading.Thread(target=self.run, name="poolfleet-imap", daemon=True)

    def _full(self) -> bool:
        # while the pool runs, results not yet taken count too (bounded memory for a consumer
        # that is slower than the cluster); after close() only tasks in flight count, so that
        # join() sees the input read to its end, as multiprocessing's does
        if self.in_flight >= self.window:
            return True
        return not self.released and len(self.futures) >= self.window

    def release(self) -> None:
        with self.cond:
            self.released = True
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def run(self) -> None:
        index = 0
        try:
            it = iter(self.iterable)
            while True:
                with self.cond:
                    while not self.stopped and self._full():
                        self.cond.wait()
                    if self.stopped:
                        return
                try:
                    part = list(itertools.islice(it, self.chunksize))
                    if not part:
                        return
                    fut = self.pool._submit_part(self.func, part, self.chunksize)
                except BaseException as exc:  # noqa: BLE001 - the input's error, for next() to raise
                    with self.cond:
                        self.error = (index, exc)
                    return
                with self.cond:
                    self.futures[index] = fut
                    self.in_flight += 1
                fut.add_done_callback(functools.partial(self._landed, index))
                index += 1
        except BaseException as exc:  # noqa: BLE001 - iter() itself failed
            with self.cond:
                self.error = (index, exc)
        finally:
            with self.cond:
                self.total = index
                self.cond.notify_all()

    def _landed(self, index: int, _f: object = None) -> None:
        with self.cond:
            self.in_flight -= 1
            self.landed.append(index)
            self.cond.notify_all()


class IMapIterator(Iterator[Any]):
    """Results of an imap (in input order) or imap_unordered (in completion order)."""

    def __init__(
        self,
        pool: Pool,
        func: Callable[..., Any] | str,
        iterable: Iterable[Any],
        chunksize: int,
        ordered: bool,
        window: int = WINDOW,
    ) -> None:
        self._feed = _Feed(pool, func, iterable, chunksize, ordered, window)
        self._next_index = 0
        self._values: deque[Any] = deque()
        self._finished = False
        pool._feeds.add(self._feed)
        self._feed.thread.start()

    def __iter__(self) -> IMapIterator:
        return self

    def __next__(self) -> Any:
        return self.next()

    def next(self, timeout: float | None = None) -> Any:
        """The next result; ``multiprocessing.TimeoutError`` if none comes within ``timeout``."""
        if self._values:
            return self._values.popleft()
        if self._finished:
            raise StopIteration
        feed = self._feed
        with feed.cond:
            if not feed.cond.wait_for(self._ready, timeout):
                raise multiprocessing.TimeoutError
            fut, error = self._take()
            feed.cond.notify_all()
        if error is not None:
            self._finished = True
            raise error
        if fut is None:
            self._finished = True
            raise StopIteration
        value = fut.result()  # raises the task's error
        if feed.chunksize > 1:
            self._values.extend(value)
            return self.next(timeout) if not self._values else self._values.popleft()
        return value

    def _ready(self) -> bool:
        feed = self._feed
        if feed.ordered:
            f = feed.futures.get(self._next_index)
            if f is not None:
                return f.done()
            if feed.error is not None and feed.error[0] == self._next_index:
                return True
            return feed.total is not None and self._next_index >= feed.total
        return bool(feed.landed) or feed.error is not None or (feed.total is not None and not feed.futures)

    def _take(self) -> tuple[TaskFuture | None, BaseException | None]:
        """Under the lock: the next finished future, or the input's error, or neither (the end)."""
        feed = self._feed
        if feed.ordered:
            f = feed.futures.pop(self._next_index, None)
            if f is not None:
                self._next_index += 1
                return f, None
        elif feed.landed:
            return feed.futures.pop(feed.landed.popleft()), None
        if feed.error is not None:
            return None, feed.error[1]
        return None, None

    def __del__(self) -> None:
        feed = getattr(self, "_feed", None)
        if feed is not None:
            feed.stop()

"""The poolfleet client: ``Client`` (futures), ``Pool`` (multiprocessing.Pool's API), ``ptask``."""

from poolfleet.client.client import Client, TaskFuture, TaskOptions, TaskRef, task_name
from poolfleet.client.pool import AsyncResult, Pool, cpu_count
from poolfleet.client.remote import TaskCancelledError, TaskLostError, TaskTimeoutError
from poolfleet.common.errors import (
    MasterUnreachable,
    PoolfleetError,
    RemoteError,
    TaskCancelled,
    TaskError,
    TaskTimeout,
)

__all__ = [
    "AsyncResult",
    "Client",
    "MasterUnreachable",
    "Pool",
    "PoolfleetError",
    "RemoteError",
    "TaskCancelled",
    "TaskCancelledError",
    "TaskError",
    "TaskFuture",
    "TaskLostError",
    "TaskOptions",
    "TaskRef",
    "TaskTimeout",
    "TaskTimeoutError",
    "cpu_count",
    "task_name",
]

"""Wire protocol constants: the magic frame, message kinds, states, error codes.

A message is a ZeroMQ multipart ``[MAGIC, kind, body]`` (the ROUTER side sees
the peer identity in front). ``kind`` is one byte, ``body`` one msgpack map.
See docs/PROTOCOL.md for every field.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

MAGIC = b"PF1"
PROTOCOL_VERSION = 1
#: Frames larger than this are refused by ZeroMQ itself (ZMQ_MAXMSGSIZE).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class MsgKind(IntEnum):
    """Every message kind, on both sockets."""

    # both sockets
    HELLO = 1
    WELCOME = 2
    ERROR = 3
    HEARTBEAT = 4
    # client -> master
    SUBMIT = 10
    RESULT_GET = 11
    CANCEL = 12
    STATUS = 13
    WORKERS = 14
    TASKS = 15  # find tasks (inspection)
    TASK_SHOW = 16
    RESOLVE = 17  # id prefixes -> ids
    TASK_RETRY = 18  # final tasks again, as new tasks (control)
    QUEUE_CONTROL = 19  # pause / resume a queue (control)
    # master -> client
    SUBMITTED = 20
    RESULTS = 21
    CANCEL_REPLY = 22
    STATUS_REPLY = 23
    WORKERS_REPLY = 24
    TASKS_REPLY = 25
    TASK_SHOW_REPLY = 26
    RESOLVE_REPLY = 27
    TASK_RETRY_REPLY = 28
    QUEUE_CONTROL_REPLY = 29
    # master -> worker
    DISPATCH = 30
    CANCEL_TASKS = 31
    ACK = 32  # results recorded (sent after the commit that holds them)
    RECALL = 33  # hand these back if not started yet
    CONTROL = 34  # drain or stop, for an operator
    # worker -> master
    TASK_RESULTS = 40
    RETURN = 41
    DRAINING = 42
    BYE = 43
    STARTED = 44  # a slot started these
    # client -> master and back: schedules and fleet-wide rate limits (control)
    SCHEDULE_CONTROL = 70
    SCHEDULE_CONTROL_REPLY = 71
    LIMIT_CONTROL = 72
    LIMIT_CONTROL_REPLY = 73
    # master -> client
    TASKS_STARTED = 60  # tasks a connection waits for have started (pushed, no req)
    # shipped code (docs/PROTOCOL.md, sections 7.16 and 8.14)
    CODE_FETCH = 50  # worker -> master: the pickled functions of these hashes
    CODE_BLOBS = 51  # master -> worker: here they are
    CODE_PUT = 90  # client -> master: store this pickled function
    CODE_PUT_REPLY = 91  # master -> client: stored
    TASK_UPDATE = 45  # output and progress of running tasks
    # client <-> master: output, progress, purge, worker control
    TASK_LOGS = 80
    TASK_LOGS_REPLY = 81
    PROGRESS = 82  # master -> client push
    QUEUE_PURGE = 83  # (control)
    QUEUE_PURGE_REPLY = 84
    WORKER_CONTROL = 85  # drain or stop a worker (control)
    WORKER_CONTROL_REPLY = 86


class TaskState(StrEnum):
    """Lifecycle of a task: [WAITING | DELAYED ->] PENDING -> DISPATCHED -> RUNNING -> one of the
    final states.

    WAITING: held by the master until the tasks it depends on have succeeded; DELAYED: held
    until its due time. DISPATCHED means sent to a worker, not known to have started; RUNNING
    means a slot of the worker started it (the worker said so).
    """

    WAITING = "WAITING"
    DELAYED = "DELAYED"
    PENDING = "PENDING"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def final(self) -> bool:
        return self not in OPEN_STATES

    @property
    def at_worker(self) -> bool:
        """Sent to a worker and not finished (DISPATCHED or RUNNING)."""
        return self is TaskState.DISPATCHED or self is TaskState.RUNNING


OPEN_STATES = frozenset(("WAITING", "DELAYED", "PENDING", "DISPATCHED", "RUNNING"))
#: Open states of a task the master holds back (not yet PENDING).
HELD_STATES = frozenset(("WAITING", "DELAYED"))
FINAL_STATES = frozenset(s for s in TaskState if s.final)


class Kind(StrEnum):
    """Where a task runs on the worker."""

    CPU = "cpu"
    IO = "io"
    CMD = "cmd"


class Role(StrEnum):
    WORKER = "worker"
    CLIENT = "client"


class ErrorCode(StrEnum):
    """Codes carried by ERROR messages and by per-task rejections."""

    BAD_FRAME = "bad_frame"
    BAD_VERSION = "bad_version"
    BAD_REQUEST = "bad_request"
    UNKNOWN_KIND = "unknown_kind"
    UNKNOWN_TASK = "unknown_task"
    UNKNOWN_ID = "unknown_id"
    NOT_REGISTERED = "not_registered"
    QUEUE_FULL = "queue_full"
    TOO_MANY_UNACKED = "too_many_unacked"
    SHUTTING_DOWN = "shutting_down"
    DUPLICATE_WORKER = "duplicate_worker"
    CMD_NOT_ALLOWED = "cmd_not_allowed"
    STANDBY = "standby"
    #: the master cannot write its journal (a full disk, a damaged file): retry later
    JOURNAL_UNAVAILABLE = "journal_unavailable"
    UNKNOWN_SCHEDULE = "unknown_schedule"
    SCHEDULE_EXISTS = "schedule_exists"
    CODE_REFUSED = "code_refused"  # shipped code not allowed for this client (says what to configure)
    CODE_TOO_LARGE = "code_too_large"
    CODE_VERSION = "code_version"  # the function was pickled by another Python than the workers'
    CODE_UNKNOWN = "code_unknown"  # a task names a shipped function the master does not hold
    NOT_ADMIN = "not_admin"
    INTERNAL = "internal"


#: Built-in tasks that run a chunk of calls of another task, named by their first argument:
#: the master routes them to workers that offer that task.
CHUNK_TASK_NAMES = frozenset(
    ("poolfleet.worker.builtins:starmap_chunk", "poolfleet.worker.builtins:map_chunk")
)

#: The name of the built-in task that runs an external program (kind cmd).
CMD_TASK_NAME = "poolfleet.worker.builtins:command"

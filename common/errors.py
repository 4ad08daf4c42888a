"""The one error tree of poolfleet.

Every error the library raises on purpose derives from :class:`PoolfleetError`.
Remote failures travel as data (type, message, traceback) and are turned into
:class:`TaskError` on the client; nothing is ever pickled.
"""

from __future__ import annotations


class PoolfleetError(Exception):
    """Base class of every poolfleet error."""


class ConfigError(PoolfleetError):
    """A setting is missing, malformed or refused (for example an insecure bind)."""


class EncodeError(PoolfleetError, TypeError):
    """A value cannot be encoded with msgpack; the message names the type."""


class DecodeError(PoolfleetError):
    """Bytes could not be decoded; keeps the bytes it failed on."""

    def __init__(self, message: str, data: bytes = b"") -> None:
        super().__init__(message)
        self.data = data


class ProtocolError(PoolfleetError):
    """A frame or message does not follow the wire protocol."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RemoteError(PoolfleetError):
    """The master answered a request with an error message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class MasterUnreachable(PoolfleetError):
    """The master did not answer within the allowed time."""


class TaskError(PoolfleetError):
    """A task ended without a value: it raised, timed out, was cancelled or lost.

    ``type``, ``message`` and ``traceback`` describe the remote failure as data.
    """

    def __init__(
        self,
        task_id: str,
        state: str,
        type: str,
        message: str,
        traceback: str = "",
    ) -> None:
        super().__init__(f"task {task_id} {state}: {type}: {message}")
        self.task_id = task_id
        self.state = state
        self.type = type
        self.message = message
        self.traceback = traceback

    def __reduce__(self) -> tuple[type[TaskError], tuple[str, str, str, str, str]]:
        return (type(self), (self.task_id, self.state, self.type, self.message, self.traceback))


class TaskTimeout(TaskError):
    """The task ran longer than its timeout and was stopped (or abandoned, for io)."""


class TaskCancelled(TaskError):
    """The task was cancelled before it finished."""

"""Chunk sizes and names, and how remote errors are rebuilt (no daemons)."""

from __future__ import annotations

import multiprocessing.pool
import pickle

from poolfleet.client import TaskError, chunks, remote
from poolfleet.common import codec
from poolfleet.worker import builtins
from poolfleet.worker.runner import error_map


def test_chunk_names_match_the_built_ins() -> None:
    assert chunks.CHUNK_TASK_NAME == builtins.CHUNK_TASK_NAME
    assert chunks.MAP_CHUNK_TASK_NAME == builtins.MAP_CHUNK_TASK_NAME


def test_default_chunksize_is_multiprocessings() -> None:
    # multiprocessing.Pool._map_async: divmod(len, processes * 4), rounded up; 0 for nothing
    assert chunks.default_chunksize(100_000, 2) == 12_500
    assert chunks.default_chunksize(100, 3) == 9
    assert chunks.default_chunksize(10, 4) == 1
    assert chunks.default_chunksize(0, 4) == 0
    assert list(chunks.chunked(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunks.chunked(list(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]


def test_an_error_map_round_trips_to_its_type() -> None:
    try:
        raise FileNotFoundError(2, "No such file", "x.txt")
    except OSError as exc:
        err = error_map(exc)
    assert err["module"] == "builtins" and err["qualname"] == "FileNotFoundError"
    assert codec.unpack(err["args"]) == [2, "No such file"]  # OSError keeps the filename apart
    rebuilt = remote.build("id", "FAILED", err)
    assert isinstance(rebuilt, FileNotFoundError) and isinstance(rebuilt, TaskError)
    assert rebuilt.errno == 2 and rebuilt.strerror == "No such file"
    assert str(rebuilt) == "[Errno 2] No such file: 'x.txt'"  # the remote str()
    assert type(rebuilt.__cause__) is multiprocessing.pool.RemoteTraceback
    copy = pickle.loads(pickle.dumps(rebuilt))
    assert type(copy) is type(rebuilt) and copy.args == rebuilt.args


def test_unencodable_arguments_and_unknown_types() -> None:
    err = error_map(ValueError(object()))
    assert "args" not in err
    assert remote.build("id", "FAILED", err).args == (err["message"],)
    unknown = dict(err, module="not_imported_anywhere", qualname="Boom")
    assert type(remote.build("id", "FAILED", unknown)) is TaskError

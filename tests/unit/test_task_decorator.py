"""``@task``: same function object, options attached, validation."""

from __future__ import annotations

import pickle

import pf_testtasks
import pytest

from poolfleet.common.protocol import Kind
from poolfleet.worker import TaskOptions, task
from poolfleet.worker.decorator import options_of


def plain(x: int) -> int:
    return x


def test_decorator_returns_the_very_same_function() -> None:
    def f() -> int:
        return 1

    assert task(kind="io")(f) is f
    assert task(f) is f
    assert f() == 1


def test_options_are_attached() -> None:
    def f() -> None: ...

    task(kind="io", timeout_s=3, retries=2)(f)
    opts = options_of(f)
    assert opts == TaskOptions(Kind.IO, 3.0, 2)
    assert isinstance(opts.timeout_s, float)
    assert opts.to_wire() == {"kind": "io", "timeout_s": 3.0, "retries": 2}


def test_bare_decorator_and_plain_function_get_defaults() -> None:
    def f() -> None: ...

    task(f)
    assert options_of(f) == TaskOptions(Kind.CPU, None, 0)
    assert options_of(plain) == TaskOptions()
    assert options_of(plain).to_wire() == {"kind": "cpu", "timeout_s": None, "retries": 0}


def test_decorated_module_function_pickles_by_reference() -> None:
    fn = pf_testtasks.decorated_cpu
    assert options_of(fn) == TaskOptions(Kind.CPU, 30.0, 2)
    assert pickle.loads(pickle.dumps(fn)) is fn  # what the process pool needs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "gpu"}, "kind must be 'cpu' or 'io', not 'gpu'"),
        ({"kind": "cmd"}, "kind 'cmd' is for external programs"),
        ({"timeout_s": 0}, "timeout_s must be positive"),
        ({"timeout_s": -1.5}, "timeout_s must be positive"),
        ({"retries": -1}, "retries must not be negative"),
    ],
)
def test_validation_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        task(**kwargs)  # type: ignore[call-overload]
    assert message in str(info.value)

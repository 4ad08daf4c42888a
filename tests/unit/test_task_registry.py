"""Which functions a worker may run: public functions defined in its --tasks modules, and built-ins."""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path
from types import ModuleType

import pf_testtasks
import pytest

from poolfleet.common.errors import ConfigError
from poolfleet.common.protocol import CMD_TASK_NAME, Kind
from poolfleet.worker.decorator import TaskOptions
from poolfleet.worker.registry import TaskRegistry, UnknownTask


@pytest.fixture(scope="module")
def registry() -> TaskRegistry:
    return TaskRegistry.load(["pf_testtasks"])


def _defined_public_functions(module: ModuleType) -> set[str]:
    """Top-level ``def`` names of a module's source, read without importing it."""
    tree = ast.parse(Path(inspect.getfile(module)).read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_")
    }


def test_public_functions_defined_in_the_module_are_tasks(registry: TaskRegistry) -> None:
    ours = {n.split(":")[1] for n in registry.functions if n.startswith("pf_testtasks:")}
    expected = _defined_public_functions(pf_testtasks)
    assert {"add", "boom", "io_sleep", "decorated_cpu", "kill_self"} <= expected
    assert ours == expected
    assert registry.get("pf_testtasks:add") is pf_testtasks.add


def test_imported_names_are_not_tasks(registry: TaskRegistry) -> None:
    # pf_testtasks imports ``task``, ``os``, ``time``...: none of them may run.
    for name in ("task", "os", "time", "Any", "annotations"):
        assert f"pf_testtasks:{name}" not in registry.functions
    with pytest.raises(UnknownTask):
        registry.get("pf_testtasks:task")


def test_builtins_are_always_loaded(registry: TaskRegistry) -> None:
    assert registry.modules == ("pf_testtasks", "poolfleet.worker.builtins")
    for name in ("noop", "echo", "sleep", "spin", "fail", "command"):
        assert f"poolfleet.worker.builtins:{name}" in registry.functions
    assert "poolfleet.worker.builtins:task" not in registry.functions


def test_options_come_from_the_decorator(registry: TaskRegistry) -> None:
    assert registry.options["pf_testtasks:decorated_cpu"] == TaskOptions(Kind.CPU, 30.0, 2)
    assert registry.options["pf_testtasks:io_sleep"].kind is Kind.IO
    assert registry.options["pf_testtasks:add"] == TaskOptions()
    assert registry.options[CMD_TASK_NAME].kind is Kind.CMD
    wire = registry.to_wire()
    assert wire["pf_testtasks:decorated_cpu"] == {"kind": "cpu", "timeout_s": 30.0, "retries": 2}
    assert wire[CMD_TASK_NAME]["kind"] == "cmd"
    assert set(wire) == set(registry.functions)


def test_module_given_twice_is_loaded_once() -> None:
    reg = TaskRegistry.load(["pf_testtasks", "pf_testtasks", "poolfleet.worker.builtins"])
    assert reg.modules == ("pf_testtasks", "poolfleet.worker.builtins")


def test_unknown_task_names_the_modules_and_the_fix(registry: TaskRegistry) -> None:
    with pytest.raises(UnknownTask) as info:
        registry.get("other.mod:fn")
    msg = str(info.value)
    assert "'other.mod:fn'" in msg and "pf_testtasks" in msg and "--tasks other.mod" in msg


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        ("pf_brokentasks", "ImportError: this module is broken on purpose"),
        ("pf_no_such_module_here", "ModuleNotFoundError"),
    ],
)
def test_import_failure_is_one_config_error_line_naming_the_module(module: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        TaskRegistry.load(["pf_testtasks", module])
    msg = str(info.value)
    assert msg.startswith(f"cannot import task module {module!r}: ")
    assert reason in msg
    assert "\n" not in msg


def test_only_public_functions_of_the_module_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pf_unit_helper.py").write_text("def shared():\n    return 1\n")
    (tmp_path / "pf_unit_tasks.py").write_text(
        "from os.path import join\n"
        "from pf_unit_helper import shared\n"
        "import json\n"
        "def public(x):\n    return x\n"
        "def _private(x):\n    return x\n"
        "class NotAFunction:\n    def method(self):\n        return 1\n"
        "CONSTANT = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        reg = TaskRegistry.load(["pf_unit_tasks"])
    finally:
        for mod in ("pf_unit_tasks", "pf_unit_helper"):
            sys.modules.pop(mod, None)
    ours = {n for n in reg.functions if n.startswith("pf_unit_tasks:")}
    assert ours == {"pf_unit_tasks:public"}
    assert reg.get("pf_unit_tasks:public")(5) == 5


def test_a_running_task_has_its_id_name_and_attempt_in_its_log_lines() -> None:
    from poolfleet.common import codec
    from poolfleet.common.ids import format_id, new_task_id
    from poolfleet.common.logsetup import current_task
    from poolfleet.worker.runner import execute

    registry = TaskRegistry.load(["pf_testtasks"])
    tid = new_task_id()
    state, value, error, _ = execute(registry, tid, 3, "pf_testtasks:log_fields", codec.pack_call((), {}))
    assert state == "SUCCEEDED", error
    assert value is not None
    assert codec.unpack(value) == {
        "task_id": format_id(tid),
        "task_name": "pf_testtasks:log_fields",
        "attempt": 3,
    }
    assert current_task.get() is None  # reset once the task returned

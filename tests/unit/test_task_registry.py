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
from poolfleet.worker.registry import (
    TaskRegistry,
    TaskSource,
    UnknownTask,
    add_task_dirs,
    check_sources,
    task_source,
)


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
    state, value, error, _, _ = execute(registry, tid, 3, "pf_testtasks:log_fields", codec.pack_call((), {}))
    assert state == "SUCCEEDED", error
    assert value is not None
    assert codec.unpack(value) == {
        "task_id": format_id(tid),
        "task_name": "pf_testtasks:log_fields",
        "attempt": 3,
    }
    assert current_task.get() is None  # reset once the task returned


# -- --tasks given as a file -----------------------------------------------------------------
def test_a_module_name_is_taken_as_it_is() -> None:
    assert task_source("mypkg.tasks") == TaskSource("mypkg.tasks")


def test_a_task_file_is_its_stem_with_its_directory_first_on_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pf_unit_filetasks.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.chdir(tmp_path.parent)
    src = task_source(f"{tmp_path.name}/pf_unit_filetasks.py")
    assert src == TaskSource("pf_unit_filetasks", tmp_path / "pf_unit_filetasks.py")
    path = ["/somewhere"]
    add_task_dirs([src, src, TaskSource("other")], path)
    assert path == [str(tmp_path), "/somewhere"]
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        reg = TaskRegistry.load([src.module])
        check_sources([src])
    finally:
        sys.modules.pop("pf_unit_filetasks", None)
    assert reg.get("pf_unit_filetasks:triple")(2) == 6


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "mytasks.py",
            "no task file {entry!r}; --tasks takes a module name without .py (--tasks mytasks, importable "
            "from the working directory or PYTHONPATH) or the path of an existing .py file",
        ),
        (
            "my-tasks.py!",
            "no task file {entry!r}; --tasks takes a module name without .py (--tasks MODULE, importable "
            "from the working directory or PYTHONPATH) or the path of an existing .py file",
        ),
    ],
)
def test_a_missing_task_file_says_to_give_the_module_name(tmp_path: Path, name: str, message: str) -> None:
    entry = str(tmp_path / name) if name.endswith("!") else name
    with pytest.raises(ConfigError) as info:
        task_source(entry)
    assert str(info.value) == message.format(entry=entry)


def test_a_task_file_that_cannot_be_a_module_name_says_to_rename_it(tmp_path: Path) -> None:
    bad = tmp_path / "my-tasks.py"
    bad.write_text("")
    with pytest.raises(ConfigError) as info:
        task_source(str(bad))
    assert str(info.value) == (
        f"task file {str(bad)!r}: 'my-tasks' is not a valid module name; rename the file "
        "(letters, digits and underscores, not starting with a digit)"
    )
    with pytest.raises(ConfigError) as info:
        task_source(str(tmp_path))
    assert str(info.value) == (
        f"task path {str(tmp_path)!r} is a directory; give a .py file, or a module name "
        "(--tasks mypkg.tasks) with the package's parent directory on PYTHONPATH"
    )


def test_a_task_file_shadowed_by_a_module_already_loaded_says_so(tmp_path: Path) -> None:
    import json

    (tmp_path / "json.py").write_text("def f():\n    return 1\n")
    src = task_source(str(tmp_path / "json.py"))
    with pytest.raises(ConfigError) as info:
        check_sources([src])
    assert str(info.value) == (
        f"task file {str(tmp_path / 'json.py')!r} is shadowed: 'import json' loads {json.__file__}; rename the file"
    )

"""Which functions a worker may run: those of its --tasks modules and the built-ins."""

from __future__ import annotations

import importlib
import inspect
import keyword
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from poolfleet.common.errors import ConfigError
from poolfleet.common.protocol import CMD_TASK_NAME, Kind
from poolfleet.common.shipping import SHIPPED_PREFIX
from poolfleet.worker.decorator import TaskOptions, options_of

BUILTIN_MODULE = "poolfleet.worker.builtins"


class UnknownTask(LookupError):
    """The name is not a task of this worker."""


@dataclass
class TaskRegistry:
    """Task name (``module:function``) -> function and its options."""

    functions: dict[str, Callable[..., Any]]
    options: dict[str, TaskOptions]
    modules: tuple[str, ...]

    @classmethod
    def load(cls, modules: Iterable[str]) -> TaskRegistry:
        """Import each module and collect its public module-level functions."""
        names = tuple(dict.fromkeys([*modules, BUILTIN_MODULE]))
        functions: dict[str, Callable[..., Any]] = {}
        options: dict[str, TaskOptions] = {}
        for modname in names:
            module = import_task_module(modname)
            for attr, obj in vars(module).items():
                if attr.startswith("_") or not inspect.isfunction(obj):
                    continue
                if obj.__module__ != module.__name__:
                    continue  # imported from elsewhere: not a task of this module
                name = f"{modname}:{attr}"
                functions[name] = obj
                options[name] = options_of(obj)
        options[CMD_TASK_NAME] = TaskOptions(Kind.CMD)
        return cls(functions, options, names)

    def get(self, name: str) -> Callable[..., Any]:
        fn = self.functions.get(name)
        if fn is None and name.startswith(SHIPPED_PREFIX):
            from poolfleet.worker.shipped import NotShipped, function

            try:
                return function(name)
            except NotShipped as exc:
                raise UnknownTask(str(exc)) from None
        if fn is None:
            module = name.split(":", 1)[0]
            raise UnknownTask(
                f"unknown task {name!r}: this worker loads {', '.join(self.modules)}; "
                f"start it with --tasks {module}"
            )
        return fn

    def to_wire(self) -> dict[str, Any]:
        return {name: opts.to_wire() for name, opts in self.options.items()}


def import_task_module(modname: str) -> ModuleType:
    """Import a --tasks module; turn any failure into one clear ConfigError line."""
    try:
        return importlib.import_module(modname)
    except Exception as exc:  # a task module may fail in any way while importing
        raise ConfigError(f"cannot import task module {modname!r}: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class TaskSource:
    """One --tasks value: a module name, or a .py file loaded as the module of its stem."""

    module: str
    file: Path | None = None  # the file given, resolved; None for a module name


def is_file_argument(entry: str) -> bool:
    """Does this --tasks value name a file (``mytasks.py``, ``./jobs/tasks.py``)?"""
    return entry.endswith(".py") or "/" in entry


def task_source(entry: str) -> TaskSource:
    """Read one --tasks value; a file must exist and its stem must be a module name."""
    if not is_file_argument(entry):
        return TaskSource(entry)
    path = Path(entry)
    stem = path.name.removesuffix(".py")
    if path.is_dir():
        raise ConfigError(
            f"task path {entry!r} is a directory; give a .py file, or a module name "
            "(--tasks mypkg.tasks) with the package's parent directory on PYTHONPATH"
        )
    if not path.is_file():
        return _no_file(entry, stem)
    if path.suffix != ".py":
        raise ConfigError(f"task file {entry!r} is not a .py file; --tasks takes a module name or a .py file")
    if not stem.isidentifier() or keyword.iskeyword(stem):
        raise ConfigError(
            f"task file {entry!r}: {stem!r} is not a valid module name; rename the file "
            "(letters, digits and underscores, not starting with a digit)"
        )
    return TaskSource(stem, path.resolve())


def _no_file(entry: str, stem: str) -> TaskSource:
    hint = f"--tasks {stem}" if stem.isidentifier() else "--tasks MODULE"
    raise ConfigError(
        f"no task file {entry!r}; --tasks takes a module name without .py ({hint}, importable "
        "from the working directory or PYTHONPATH) or the path of an existing .py file"
    )


def add_task_dirs(sources: Iterable[TaskSource], path: list[str]) -> None:
    """Put the directory of each task file first on ``path`` (``sys.path``), so that this process
    and the pool children, which import task modules by name, find the file as its stem."""
    for src in sources:
        if src.file is not None and str(src.file.parent) not in path:
            path.insert(0, str(src.file.parent))


def check_sources(sources: Iterable[TaskSource]) -> None:
    """After loading: each task file must be the module its stem imported (not a namesake)."""
    import sys

    for src in sources:
        if src.file is None:
            continue
        found = getattr(sys.modules.get(src.module), "__file__", None)
        if found is None or Path(found).resolve() != src.file:
            where = found or "a built-in module"
            raise ConfigError(
                f"task file {str(src.file)!r} is shadowed: 'import {src.module}' loads {where}; rename the file"
            )

"""Which functions a worker may run: those of its --tasks modules and the built-ins."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from poolfleet.common.errors import ConfigError
from poolfleet.common.protocol import CMD_TASK_NAME, Kind
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

"""What to tell someone who asked for a task no worker offers (pure: no I/O, no state).

The master calls :func:`unknown_task_message` when it refuses a submit with
``unknown_task``; the message names the likely fix, so a typo in a function name
and a module no worker loads get different advice.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

#: At most this many close names are suggested, and this many modules listed.
MAX_SUGGESTIONS = 3
MAX_MODULES = 10
#: difflib's similarity cut-off (0..1) for a name to count as close.
CUTOFF = 0.6


def split_name(name: str) -> tuple[str, str]:
    """``module:function`` -> (module, function); a name without ':' is all module."""
    module, _, function = name.partition(":")
    return module, function


def unknown_task_message(name: str, offered: Iterable[str]) -> str:
    """The error text for a submit of ``name`` when the workers offer the names ``offered``.

    - The module is loaded but has no such function: say so, and name the closest
      functions it offers (or, when none is close, some of them).
    - No worker loads the module: say so, list the modules they load, suggest the same
      function in a module of a close name (a typo), and say to start a worker with
      ``--tasks MODULE``.
    - A name without ``:`` gets the expected shape.
    """
    names = sorted(set(offered))
    module, function = split_name(name)
    in_module = sorted(split_name(n)[1] for n in names if split_name(n)[0] == module)
    if not function:
        text = f"task name {name!r} must look like module:function"
        return text + (f"; module {module} offers {_some(in_module)}" if in_module else "")
    if in_module:
        close = difflib.get_close_matches(function, in_module, n=MAX_SUGGESTIONS, cutoff=CUTOFF)
        text = f"unknown task {name!r}: the workers load module {module} but it has no function {function!r}"
        if close:
            return text + "; did you mean " + _either(f"{module}:{c}" for c in close) + "?"
        return text + f"; it offers {_some(in_module)} (see 'ptask workers')"
    modules = sorted({split_name(n)[0] for n in names})
    text = f"unknown task {name!r}: no worker loads module {module}"
    if modules:
        listed = ", ".join(modules[:MAX_MODULES]) + (" ..." if len(modules) > MAX_MODULES else "")
        text += f" (the workers load {listed})"
    # a typo in the module's name: the same function in a module of a close name
    close_modules = difflib.get_close_matches(module, modules, n=MAX_SUGGESTIONS, cutoff=CUTOFF)
    close = [f"{m}:{function}" for m in close_modules if f"{m}:{function}" in names]
    if close:
        text += "; did you mean " + _either(close) + "?"
        return text + f" Or start a worker with --tasks {module}"
    return text + f"; start a worker with --tasks {module}"


def _either(options: Iterable[str]) -> str:
    items = list(options)
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " or " + items[-1]


def _some(items: list[str]) -> str:
    shown = items[:MAX_SUGGESTIONS]
    more = f" and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return ", ".join(shown) + more

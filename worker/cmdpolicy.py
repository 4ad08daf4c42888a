"""Which environment variables a cmd task may set for the program it runs.

An allowed program is only as safe as its environment: ``LD_PRELOAD`` makes the
dynamic loader run any library inside it, ``BASH_ENV`` makes a shell run a file
first, ``PYTHONPATH``, ``PERL5OPT`` or ``NODE_OPTIONS`` make an interpreter load
other code. So a task may set such variables only when the worker allows them by
name (``pworker --allow-cmd-env NAME``). Everything else a task sets is passed on.

Pure: no I/O, no state, nothing happens on import. The worker checks every cmd
task before it starts the program; a master that knows a worker's allow-list can
call :func:`env_refusal` at submit time to refuse the task earlier.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

#: Refused names (exact, case-sensitive, as the programs read them).
REFUSED_NAMES: frozenset[str] = frozenset(
    {
        # the C library: loadable conversion modules, tunables, locale and message files
        "GCONV_PATH",
        "GLIBC_TUNABLES",
        "LOCPATH",
        "NLSPATH",
        # shells: start-up files, imported options, code run before commands or prompts
        "BASH_ENV",
        "ENV",
        "ZDOTDIR",
        "SHELLOPTS",
        "BASHOPTS",
        "PS4",
        "PROMPT_COMMAND",
        "IFS",
        # interpreters and runtimes: options and module search paths
        "NODE_OPTIONS",
        "NODE_PATH",
        "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS",
        "JDK_JAVA_OPTIONS",
        "CLASSPATH",
        "TCLLIBPATH",
        "PHPRC",
        "PHP_INI_SCAN_DIR",
        "R_PROFILE",
        "R_PROFILE_USER",
        "R_ENVIRON",
        "R_ENVIRON_USER",
        "R_LIBS",
        "R_LIBS_USER",
        "GEM_HOME",
        "GEM_PATH",
        # programs that run a command named in the environment
        "GIT_SSH",
        "GIT_SSH_COMMAND",
        "GIT_EXEC_PATH",
        "GIT_ASKPASS",
        "GIT_EXTERNAL_DIFF",
        "GIT_PROXY_COMMAND",
        "SSH_ASKPASS",
        "LESSOPEN",
        "LESSCLOSE",
    }
)

#: Refused prefixes: every name that starts with one of these.
REFUSED_PREFIXES: tuple[str, ...] = (
    "LD_",  # the dynamic loader: LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, ...
    "DYLD_",  # the macOS dynamic loader
    "BASH_FUNC_",  # functions exported to bash
    "PYTHON",  # PYTHONPATH, PYTHONSTARTUP, PYTHONHOME, PYTHONWARNINGS, ...
    "PERL",  # PERL5OPT, PERL5LIB, PERLLIB, PERL5DB, ...
    "RUBY",  # RUBYOPT, RUBYLIB
    "LUA_",  # LUA_INIT (code to run), LUA_PATH, LUA_CPATH
    "GIT_CONFIG",  # configuration injected through the environment (core.sshCommand, ...)
)

#: The pworker option, and its environment variable, that allow a name.
ALLOW_FLAG = "--allow-cmd-env"
ALLOW_ENV = "POOLFLEET_WORKER_ALLOW_CMD_ENV"


class CmdEnvRefused(PermissionError):
    """A cmd task sets an environment variable the worker does not allow."""


def is_refused(name: str) -> bool:
    """True if ``name`` changes how a program is loaded or interpreted (before any allow-list)."""
    return name in REFUSED_NAMES or name.startswith(REFUSED_PREFIXES)


def refused_names(env: Iterable[str], allowed: Collection[str] = ()) -> list[str]:
    """The names of ``env`` (a mapping or its keys) that are refused and not allowed, sorted."""
    return sorted({name for name in env if is_refused(name) and name not in allowed})


def env_refusal(env: Iterable[str] | None, allowed: Collection[str] = ()) -> str | None:
    """Why a cmd task with this ``env`` is refused, naming each variable and the option that
    would allow it; ``None`` if every name may be set."""
    names = refused_names(env or (), allowed)
    if not names:
        return None
    flags = " ".join(f"{ALLOW_FLAG} {n}" for n in names)
    what = "variable" if len(names) == 1 else "variables"
    return (
        f"cmd task env sets {', '.join(names)}: environment {what} that change how a program is "
        f"loaded or interpreted are refused; the worker allows them only when started with "
        f"{flags} (or {ALLOW_ENV}={','.join(names)})"
    )


def check_env(env: Iterable[str] | None, allowed: Collection[str] = ()) -> None:
    """Raise :class:`CmdEnvRefused` with :func:`env_refusal`'s message if ``env`` is refused."""
    message = env_refusal(env, allowed)
    if message is not None:
        raise CmdEnvRefused(message)

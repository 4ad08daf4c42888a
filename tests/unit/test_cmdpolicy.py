"""The cmd environment rule: which variables a cmd task may set, and what a refusal says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from poolfleet.common.config import resolve
from poolfleet.common.errors import ConfigError
from poolfleet.worker import cmdpolicy
from poolfleet.worker.cmdpolicy import CmdEnvRefused, check_env, env_refusal, is_refused, refused_names
from poolfleet.worker.daemon import WorkerSettings

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize(
    "name",
    [
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_AUDIT",
        "DYLD_INSERT_LIBRARIES",
        "GCONV_PATH",
        "GLIBC_TUNABLES",
        "BASH_ENV",
        "ENV",
        "BASH_FUNC_ls%%",
        "PYTHONPATH",
        "PYTHONSTARTUP",
        "PYTHONHOME",
        "PERL5OPT",
        "PERL5LIB",
        "RUBYOPT",
        "NODE_OPTIONS",
        "JAVA_TOOL_OPTIONS",
        "LUA_INIT",
        "GIT_SSH_COMMAND",
        "GIT_CONFIG_COUNT",
    ],
)
def test_loader_and_interpreter_hooks_are_refused(name: str) -> None:
    assert is_refused(name)
    assert refused_names({name: "x"}) == [name]


@pytest.mark.parametrize(
    "name", ["FOO", "LANG", "TZ", "HOME", "MY_LD_PRELOAD", "ld_preload", "NODE_ENV", "TERM"]
)
def test_ordinary_variables_pass(name: str) -> None:
    assert not is_refused(name)
    assert env_refusal({name: "x"}) is None
    check_env({name: "x"})


def test_allowed_by_name_only() -> None:
    env = {"LD_PRELOAD": "/x.so", "LD_LIBRARY_PATH": "/x", "FOO": "1"}
    assert refused_names(env, {"LD_PRELOAD"}) == ["LD_LIBRARY_PATH"]
    assert refused_names(env, {"LD_PRELOAD", "LD_LIBRARY_PATH"}) == []
    assert refused_names(env, {"LD_*"}) == ["LD_LIBRARY_PATH", "LD_PRELOAD"]  # no patterns


def test_refusal_names_each_variable_and_the_flag() -> None:
    message = env_refusal({"BASH_ENV": "/tmp/x", "LD_PRELOAD": "/x.so", "FOO": "1"})
    assert message is not None
    assert "BASH_ENV, LD_PRELOAD" in message
    assert "--allow-cmd-env BASH_ENV --allow-cmd-env LD_PRELOAD" in message
    assert "POOLFLEET_WORKER_ALLOW_CMD_ENV=BASH_ENV,LD_PRELOAD" in message
    with pytest.raises(CmdEnvRefused, match="--allow-cmd-env LD_PRELOAD"):
        check_env({"LD_PRELOAD": "/x.so"})


def test_no_env_is_fine() -> None:
    assert env_refusal(None) is None
    assert env_refusal({}) is None
    check_env(None, frozenset())


def test_importing_the_module_does_nothing() -> None:
    """A master can import it: no sockets, pools, signals or third-party packages come along,
    and importing prints nothing."""
    heavy = ("zmq", "msgpack", "structlog", "typer", "multiprocessing", "threading", "signal", "subprocess")
    code = (
        "import sys; before = set(sys.modules); import poolfleet.worker.cmdpolicy; "
        f"print(sorted(n for n in set(sys.modules) - before if n.split('.')[0] in {heavy!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]" and out.stderr == ""


def test_security_doc_lists_every_refused_name_and_prefix() -> None:
    text = (DOCS / "SECURITY.md").read_text()
    for name in sorted(cmdpolicy.REFUSED_NAMES) + [f"{p}*" for p in cmdpolicy.REFUSED_PREFIXES]:
        assert f"`{name}`" in text, f"docs/SECURITY.md does not list {name}"


def test_worker_setting_from_flag_and_environment() -> None:
    s = resolve(WorkerSettings, {"allow_cmd_env": None}, {cmdpolicy.ALLOW_ENV: "LD_PRELOAD, PYTHONPATH"},
                "POOLFLEET_WORKER_", None, "worker")  # fmt: skip
    assert s.allow_cmd_env == ("LD_PRELOAD", "PYTHONPATH")
    s = resolve(WorkerSettings, {"allow_cmd_env": ["BASH_ENV"]}, {cmdpolicy.ALLOW_ENV: "LD_PRELOAD"},
                "POOLFLEET_WORKER_", None, "worker")  # fmt: skip
    assert s.allow_cmd_env == ("BASH_ENV",)
    with pytest.raises(ConfigError, match="not an environment variable name"):
        WorkerSettings(allow_cmd_env=("A=B",))

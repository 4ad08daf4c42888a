"""A cmd task cannot set the variables that change how an allowed program is loaded or
interpreted, unless the worker allows them by name (real daemons, real programs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pfharness import Cluster

from poolfleet.client import Client, RemoteError

#: No such library: the dynamic loader says so on stderr when it honours LD_PRELOAD.
PRELOAD = "/nonexistent/poolfleet-preload-test.so"


def _refused(f: object, name: str) -> RemoteError:
    # the master knows what the connected workers allow: it refuses at submit, naming the flag
    with pytest.raises(RemoteError) as info:
        f.result(30)  # type: ignore[attr-defined]
    err = info.value
    assert err.code == "cmd_not_allowed"
    assert name in err.message and f"--allow-cmd-env {name}" in err.message
    return err


def test_loader_and_shell_hooks_are_refused_and_others_pass(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    c = make_cluster()
    c.start_master()
    w = c.start_worker("--allow-cmd", "sh", "--allow-cmd", "bash", name="wenv", cpu=1, io=1)
    marker = tmp_path / "bash_env_ran"
    startup = tmp_path / "startup.sh"
    startup.write_text(f"touch {marker}\n")
    with Client(c.client_endpoint) as cl:
        _refused(cl.run(["sh", "-c", "echo ran"], env={"LD_PRELOAD": PRELOAD}), "LD_PRELOAD")
        _refused(cl.run(["bash", "-c", "true"], env={"BASH_ENV": str(startup)}), "BASH_ENV")
        err = _refused(
            cl.run(["sh", "-c", "true"], env={"PYTHONPATH": "/x", "LD_AUDIT": "/y", "FOO": "1"}), "LD_AUDIT"
        )
        assert "PYTHONPATH" in err.message and "FOO" not in err.message
        assert not marker.exists()  # the program never started
        # ordinary variables reach the program
        out = cl.run(["sh", "-c", 'printf %s "$FOO"'], env={"FOO": "bar"}).result(30)
        assert out == {"exit_code": 0, "stdout": "bar", "stderr": ""}
    assert w.alive()


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_a_variable_allowed_by_name_reaches_the_program(
    make_cluster: type[Cluster], tmp_path: Path, how: str
) -> None:
    c = make_cluster()
    c.start_master()
    if how == "flag":
        c.start_worker("--allow-cmd", "sh", "--allow-cmd-env", "LD_PRELOAD", name="wallow", cpu=1, io=1)
    else:
        env = {"POOLFLEET_WORKER_ALLOW_CMD_ENV": "LD_PRELOAD"}
        c.start_worker("--allow-cmd", "sh", name="wallow", cpu=1, io=1, env=env)
    with Client(c.client_endpoint) as cl:
        out = cl.run(["sh", "-c", "echo ran"], env={"LD_PRELOAD": PRELOAD}).result(30)
        assert out["stdout"] == "ran\n"
        assert "LD_PRELOAD" in out["stderr"]  # the loader saw it (and could not load it)
        # allowing one name allows only that name
        _refused(cl.run(["sh", "-c", "true"], env={"LD_LIBRARY_PATH": str(tmp_path)}), "LD_LIBRARY_PATH")

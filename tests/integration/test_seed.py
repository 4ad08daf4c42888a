"""The seed document's Pool example, run as a script against a real cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pfharness import Cluster, daemon_env
from pfseed import IN_MAIN, ON_CLUSTER


def run_script(cluster: Cluster, tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "seed_pool.py"
    script.write_text(text)
    env = daemon_env({"POOLFLEET_MASTER": cluster.client_endpoint})
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)


def test_seed_pool_example_runs_on_the_cluster(cluster: Cluster, tmp_path: Path) -> None:
    r = run_script(cluster, tmp_path, ON_CLUSTER)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1:4] == ["subprocess Start", "before close", "All subprocess done"]
    assert lines[4:] == [f"hello {i}" for i in range(10)]
    # the tasks ran in the workers' pool children, which printed there, not here
    assert "Run task" not in r.stdout
    assert any("Run task 0" in p.log_path.read_text() for p in cluster.workers)


def test_seed_function_left_in_main_gets_a_clear_error(cluster: Cluster, tmp_path: Path) -> None:
    r = run_script(cluster, tmp_path, IN_MAIN)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "long_time_wait" in last and "__main__" in last and "--tasks" in last

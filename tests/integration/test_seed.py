"""The seed document's Pool example, run as a script against a real cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pfharness import Cluster, daemon_env

# The example's main block, verbatim; only its import lines differ from the seed
# (Pool and cpu_count from poolfleet, the function from a module the workers load).
MAIN_BLOCK = """
if __name__ == '__main__':
    print("Parent pid is %s" % os.getpid())
    # highlight-next-line
    p = Pool(cpu_count())  # 这个是进程池，默认是CPU核数，可以自己指定
    jobs = []
    print("subprocess Start")
    for i in range(10):
        # highlight-next-line
        jobs.append(p.apply_async(long_time_wait, args=(i,)))  # 这个是异步的，异步的执行，不会阻塞当前的进程
        # jobs.append(p.apply(long_time_wait, args=(1,)))  # 这个是同步的，同步的执行，会阻塞当前的进程
    print('before close')
    p.close() # 关闭进程池，表示不能再往进程池中添加进程，需要在join之前调用
    p.join() # 等待进程池中的所有进程执行完毕
    print("All subprocess done")
    for job in jobs:
        print(job.get()) # 获取进程的返回值
"""

ON_CLUSTER = (
    """\
from poolfleet.client import Pool, cpu_count
import os
import time
import random
from pf_testtasks import long_time_wait
"""
    + MAIN_BLOCK
)

IN_MAIN = (
    """\
from poolfleet.client import Pool, cpu_count
import os
import time
import random


def long_time_wait(name):
    print("Run task %s, pid is %s" % (name, os.getpid()))
    start_time = time.time()
    time.sleep(random.random() * 3)
    end_time = time.time()
    print("Task %s runs %0.2f sec" % (name, (end_time - start_time)))
    return f'hello {name}'
"""
    + MAIN_BLOCK
)


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

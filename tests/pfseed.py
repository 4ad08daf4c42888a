"""The seed document's Pool example as script texts, for the tests that run it as a script."""

from __future__ import annotations

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

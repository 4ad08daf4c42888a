"""The unknown-task message: a typo in a function name and a module no worker loads get different advice."""

from __future__ import annotations

from poolfleet.common.suggest import unknown_task_message

OFFERED = [
    "mytasks:square",
    "mytasks:squares",
    "mytasks:cube",
    "poolfleet.worker.builtins:echo",
    "poolfleet.worker.builtins:noop",
    "poolfleet.worker.command:run",
]


def test_typo_in_the_function_names_the_loaded_module_and_the_closest_names() -> None:
    assert unknown_task_message("mytasks:sqaure", OFFERED) == (
        "unknown task 'mytasks:sqaure': the workers load module mytasks but it has no function 'sqaure'; "
        "did you mean mytasks:square or mytasks:squares?"
    )


def test_one_close_name_is_named_alone() -> None:
    assert unknown_task_message("mytasks:cub", OFFERED) == (
        "unknown task 'mytasks:cub': the workers load module mytasks but it has no function 'cub'; "
        "did you mean mytasks:cube?"
    )


def test_no_close_function_lists_what_the_module_offers() -> None:
    offered = [f"mytasks:f{i}" for i in range(5)]
    assert unknown_task_message("mytasks:zzzzzzzz", offered) == (
        "unknown task 'mytasks:zzzzzzzz': the workers load module mytasks but it has no function "
        "'zzzzzzzz'; it offers f0, f1, f2 and 2 more (see 'ptask workers')"
    )


def test_module_no_worker_loads_says_to_start_one_with_tasks() -> None:
    assert unknown_task_message("imaging:square", OFFERED) == (
        "unknown task 'imaging:square': no worker loads module imaging (the workers load mytasks, "
        "poolfleet.worker.builtins, poolfleet.worker.command); start a worker with --tasks imaging"
    )


def test_close_module_without_that_function_is_not_suggested() -> None:
    assert unknown_task_message("mytask:resize", OFFERED) == (
        "unknown task 'mytask:resize': no worker loads module mytask (the workers load mytasks, "
        "poolfleet.worker.builtins, poolfleet.worker.command); start a worker with --tasks mytask"
    )


def test_typo_in_the_module_name_suggests_the_loaded_one_and_the_fix() -> None:
    assert unknown_task_message("mytask:square", OFFERED) == (
        "unknown task 'mytask:square': no worker loads module mytask (the workers load mytasks, "
        "poolfleet.worker.builtins, poolfleet.worker.command); did you mean mytasks:square? "
        "Or start a worker with --tasks mytask"
    )


def test_no_workers_at_all() -> None:
    assert unknown_task_message("mytasks:square", []) == (
        "unknown task 'mytasks:square': no worker loads module mytasks; start a worker with --tasks mytasks"
    )


def test_many_modules_are_cut_short_and_duplicates_count_once() -> None:
    offered = [f"m{i:02d}:f" for i in range(12)] * 2
    msg = unknown_task_message("zz:f", offered)
    assert "(the workers load m00, m01, m02, m03, m04, m05, m06, m07, m08, m09 ...)" in msg
    assert msg.endswith("; start a worker with --tasks zz")


def test_a_name_without_colon_is_all_module() -> None:
    assert unknown_task_message("mytasks", OFFERED) == (
        "task name 'mytasks' must look like module:function; module mytasks offers cube, square, squares"
    )
    assert unknown_task_message("imaging", OFFERED) == "task name 'imaging' must look like module:function"

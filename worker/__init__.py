"""The pworker daemon and the ``@task`` decorator task authors use."""

from poolfleet.worker.decorator import TaskOptions, task

__all__ = ["TaskOptions", "task"]

"""A task module that fails to import, for the worker's error path."""

raise ImportError("this module is broken on purpose")

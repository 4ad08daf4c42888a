"""The pmaster daemon: queue, journal, scheduler and the two ROUTER sockets."""

"""The benchmark harness behind ``make bench`` (run as ``python -m bench``)."""

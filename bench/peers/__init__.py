"""``make bench-peers``: the workloads of ``make bench`` through Ray, Dask distributed, Celery
and RQ, beside poolfleet and the local pool (run as ``python -m bench.peers``)."""

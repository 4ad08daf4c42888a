"""One version of the module ``pf_defaults``: ``nap`` declares a timeout of 0.2 s.

The other version (../defaults_long/pf_defaults.py) declares 30 s for the same name.
"""

from __future__ import annotations

import time

from poolfleet.worker import task


@task(kind="cpu", timeout_s=0.2)
def nap(seconds: float) -> str:
    time.sleep(seconds)
    return "short version finished"

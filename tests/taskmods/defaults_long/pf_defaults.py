"""One version of the module ``pf_defaults``: ``nap`` declares a timeout of 30 s.

The other version (../defaults_short/pf_defaults.py) declares 0.2 s for the same name.
"""

from __future__ import annotations

import time

from poolfleet.worker import task


@task(kind="cpu", timeout_s=30)
def nap(seconds: float) -> str:
    time.sleep(seconds)
    return "long version finished"

"""Crash points for fault tests: `CLICKHOUSE_ETL_FAILPOINT=<name>` SIGKILLs the process when it gets there.

A real SIGKILL at an exact stage boundary is the only honest way to prove crash recovery; unset (always,
outside fault tests) a failpoint costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

FAILPOINT_VARIABLE = "CLICKHOUSE_ETL_FAILPOINT"


def failpoint(name: str) -> None:
    if os.environ.get(FAILPOINT_VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)

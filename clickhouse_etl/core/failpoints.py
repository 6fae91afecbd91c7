"""Fault points for fault tests: `CLICKHOUSE_ETL_FAILPOINT=<name>` SIGKILLs the process when it gets there;
`<name>:sleep=<seconds>` pauses it there instead, so a test can stop a service at an exact stage.
`@<file>` reads the failpoint from that file each time, so a test can change it while long-lived run
workers keep their environment (an empty or missing file is no failpoint).

A real SIGKILL (or outage) at an exact stage boundary is the only honest way to prove crash recovery; unset
(always, outside fault tests) a failpoint costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

FAILPOINT_VARIABLE = "CLICKHOUSE_ETL_FAILPOINT"


def failpoint(name: str) -> None:
    point = os.environ.get(FAILPOINT_VARIABLE)
    if point is None:
        return
    if point.startswith("@"):
        try:
            point = Path(point[1:]).read_text().strip()
        except FileNotFoundError:
            return
    where, _, action = point.partition(":")
    if where != name:
        return
    if action.startswith("sleep="):
        time.sleep(float(action.removeprefix("sleep=")))
    else:
        os.kill(os.getpid(), signal.SIGKILL)

"""Whether a process is alive (a run's recorded worker, a service the local stack started); its peak memory."""

from __future__ import annotations

import os
import resource


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except OSError:
        return True


def peak_rss_bytes() -> int:
    """This process's peak resident set since it started its program.

    Read from /proc (VmHWM) where there is one: `ru_maxrss` of a process started by another (fork or vfork,
    then exec) never reports less than its parent's peak, since Linux carries the replaced memory's
    high-water mark across exec, so a small process started by a large one would report the large one's.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

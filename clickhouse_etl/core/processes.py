"""Whether a process is alive (a run's recorded worker, a service the local stack started); its peak memory,
and giving back the memory its C heap holds free."""

from __future__ import annotations

import ctypes
import functools
import os
import resource
from collections.abc import Callable


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


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's; other C libraries lack it
    except (AttributeError, OSError):
        return None


def return_free_heap() -> None:
    """Give the pages the C heap holds free back to the system, where the C library can (glibc).

    glibc keeps what a step freed (Kafka's fetch buffers, Python's larger objects) resident in its arenas;
    trimmed before a memory-hungry phase, that phase's peak stacks on what is in use, not on what was.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

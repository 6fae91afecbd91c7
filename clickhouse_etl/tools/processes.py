"""Processes the tools start and stop: a Dagster daemon or webserver, run workers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import psutil


def stop_process_group(process: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop a process and its process group; return once every member is gone.

    The leader is asked first (SIGTERM), so it stops its own children in order: a daemon whose code server
    died first would log errors for every sensor tick in between, and a worker's children would drop their
    runs. What is left after half of `grace` gets SIGTERM, and after `grace` SIGKILL.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    started = time.monotonic()
    signals = [(grace / 2, signal.SIGTERM), (grace, signal.SIGKILL)]
    while _group_alive(process):
        if signals and time.monotonic() - started > signals[0][0]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signals.pop(0)[1])
        time.sleep(0.1)


def _group_alive(leader: subprocess.Popen) -> bool:
    leader.poll()  # reap the leader, so it does not linger as a zombie member
    try:
        os.killpg(leader.pid, 0)
    except ProcessLookupError:
        return False
    # Only zombies left (children reaped by nobody yet) count as gone.
    for member in psutil.process_iter():
        try:
            if os.getpgid(member.pid) == leader.pid and member.status() != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False

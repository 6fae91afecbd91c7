"""A process's peak RSS is its own, not the peak of the larger process that started it."""

from __future__ import annotations

import json
import subprocess
import sys

from clickhouse_etl.core.processes import peak_rss_bytes

CHILD = (
    "import json, resource; from clickhouse_etl.core.processes import peak_rss_bytes; "
    "print(json.dumps([peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))"
)


def test_peak_rss_of_a_small_child_of_a_large_parent_is_the_childs() -> None:
    held = bytearray(512 * 2**20)
    held[::4096] = b"\1" * len(range(0, len(held), 4096))  # touch every page: resident, not just reserved
    assert peak_rss_bytes() >= 512 * 2**20
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    own, rusage = json.loads(child.stdout)
    # getrusage alone would report the parent's peak: Linux carries it across the child's exec.
    assert rusage >= 512 * 2**20
    assert 0 < own < 256 * 2**20
    del held

"""Pages the C heap holds free go back to the system when asked, not only when the heap's top is free."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest

# 256 MiB in blocks below glibc's mmap threshold (so on the heap), all freed but the last: the block in use
# at the top keeps free() from shrinking the heap, so the freed pages stay resident until trimmed.
CHILD = """
import ctypes, json
from clickhouse_etl.core.processes import return_free_heap

def resident_anonymous_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
block = 64 * 1024
blocks = [libc.malloc(block) for _ in range(4096)]
for address in blocks:
    ctypes.memset(address, 1, block)
for address in blocks[:-1]:
    libc.free(address)
held = resident_anonymous_bytes()
return_free_heap()
print(json.dumps([held, resident_anonymous_bytes()]))
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "malloc_trim"), reason="no malloc_trim: not glibc")
def test_freed_heap_pages_below_a_block_in_use_are_returned() -> None:
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    held, after = json.loads(child.stdout)
    assert held - after >= 200 * 2**20, (held, after)

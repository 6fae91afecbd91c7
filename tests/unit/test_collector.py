"""Start-up without cyclic collections: a spawned process's start-up, arguments included, runs with the
collector off, and the collector is on again once the start-up objects are frozen."""

from __future__ import annotations

import gc
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

from clickhouse_etl.core.collector import freeze_startup_objects, pickled_start_up, start_up_pickled

_seen: dict[str, bool] = {}


class CollectorStateWhenUnpickled:
    """Unpickles as whether the collector was on at that moment."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return gc.isenabled, ()


def _start_up(collector_on_while_unpickling: bool, name: str) -> None:
    _seen.update(unpickling=collector_on_while_unpickling, starting=gc.isenabled(), named=name == "worker")
    freeze_startup_objects()


def _after_start_up() -> dict[str, bool]:
    return {**_seen, "after": gc.isenabled(), "frozen": gc.get_freeze_count() > 0}


def test_a_spawned_process_starts_up_without_collections_and_collects_after() -> None:
    start_up = pickled_start_up(_start_up, CollectorStateWhenUnpickled(), "worker")
    with ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"), initializer=start_up_pickled, initargs=(start_up,)
    ) as pool:
        seen = pool.submit(_after_start_up).result(timeout=120)
    assert seen == {"unpickling": False, "starting": False, "named": True, "after": True, "frozen": True}

"""The run coordinator: Dagster's run queue, with a shortcut for a run nothing stands in front of.

Dagster's queue daemon passes over the queue once a second at best, so every queued run waits for it; for a
micro-batch that is most of its request → start time. A run whose partition slot is free (no other run of
its pipeline's partition queued or in flight) while the deployment is under its limit of runs in progress
is launched at once, as Dagster's default coordinator would; every other run is queued as usual, so runs of
one partition still run in order, one at a time, and the limits of dagster.yaml still hold. Two runs of a
slot submitted at the same moment both find the other and are queued.
"""

from __future__ import annotations

import dagster as dg
from dagster._core.run_coordinator import QueuedRunCoordinator, SubmitRunContext

from clickhouse_etl.orchestration import tags

WAITING_OR_ACTIVE = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


class PartitionSlotRunCoordinator(QueuedRunCoordinator):
    """Queued run coordinator that launches a run at once when its partition slot is free."""

    def submit_run(self, context: SubmitRunContext) -> dg.DagsterRun:
        run = context.dagster_run
        if run.status == dg.DagsterRunStatus.NOT_STARTED and self._may_start_now(run):
            self._instance.launch_run(run.run_id, context.workspace)
            started = self._instance.get_run_by_id(run.run_id)
            assert started is not None
            return started
        return super().submit_run(context)

    def _may_start_now(self, run: dg.DagsterRun) -> bool:
        slot = run.tags.get(tags.PARTITION_SLOT)
        if slot is None:
            return False
        others = self._instance.get_runs(
            filters=dg.RunsFilter(statuses=WAITING_OR_ACTIVE, tags={tags.PARTITION_SLOT: slot})
        )
        if any(other.run_id != run.run_id for other in others):
            return False
        queue = self._instance.get_concurrency_config().run_queue_config
        limit = queue.max_concurrent_runs if queue is not None else -1
        if limit < 0:
            return True
        in_progress = dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED])
        return self._instance.get_runs_count(in_progress) < limit

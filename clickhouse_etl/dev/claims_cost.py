"""What a claim costs Redis: CPU per new claim and per duplicate, memory and append-only file per claim, and the
time a restart takes to load them — measured on a scratch redis-server started with the stack's options.

    python -m clickhouse_etl.dev.claims_cost [--claims 1000000] [--batches 3] [--restart] [--options "..."]
        [--previous-bucket]

Each batch claims `--claims` new keys through the project's claim client, then the same keys again (all
duplicates). With `--previous-bucket`, as many claims of other keys as all the batches make are first written
one TTL earlier (and the append-only file rewrite they start waited for): every claim call then also looks
the keys up in the previous bucket, as it does in steady state, from a pipeline's second TTL on (a fresh
Redis, and the first TTL, have no previous bucket). Redis CPU is read from `INFO cpu` (all its threads)
around each call; the append-only file's rewrites run in a forked child, whose CPU is reported apart.
`--options` adds redis-server options (e.g. `--appendfsync always`, `--io-threads 2 --io-threads-do-reads
yes`) to compare forms side by side.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import polars as pl
import redis

from clickhouse_etl.clients import claims
from clickhouse_etl.core.pipeline.model import Dedup
from clickhouse_etl.dev.claims_prefill import claim_a_ttl_ago
from clickhouse_etl.dev.redis_server import SERVER_OPTIONS, RedisServer, wait_for_aof_rewrite

TTL_SECONDS: int = Dedup.model_fields["ttl_seconds"].default  # a pipeline's when its file names none


def _cpu(client: redis.Redis) -> tuple[float, float]:
    cpu = client.info("cpu")
    return (
        cpu["used_cpu_user"] + cpu["used_cpu_sys"],
        cpu["used_cpu_user_children"] + cpu["used_cpu_sys_children"],
    )


def _restart(server: RedisServer, pid: int) -> tuple[int, dict[str, object]]:
    files = {path.name: path.stat().st_size for path in (server.home / "appendonlydir").glob("*")}
    server.stop(pid)
    started = time.perf_counter()
    pid = server.start()
    this_start = server.log_path.read_text().split("Server initialized")[-1]
    loaded = [line.split("* ", 1)[-1] for line in this_start.splitlines() if "DB loaded from" in line]
    return pid, {"ready_seconds": round(time.perf_counter() - started, 2), "files": files, "log": loaded[-3:]}


def measure(
    claim_count: int,
    batches: int,
    port: int,
    options: tuple[str, ...],
    restart: bool,
    namespace: str = "ce:dedup:ad_clicks",
    integer_positions: bool = False,
    previous_bucket: bool = False,
) -> dict[str, object]:
    home = Path(tempfile.mkdtemp(prefix="claims-cost-"))
    server = RedisServer("127.0.0.1", port, home, options=SERVER_OPTIONS + options)
    pid = server.start()
    try:
        client = redis.Redis(port=port)
        url = f"redis://127.0.0.1:{port}/0"
        if previous_bucket:
            claim_a_ttl_ago(url, namespace, claim_count * batches, TTL_SECONDS, wait_seconds=10)
        memory_before = client.info("memory")["used_memory"]
        figures: dict[str, object] = {
            "options": " ".join(options),
            "namespace": namespace,
            "claims_per_batch": claim_count,
            "previous_bucket": previous_bucket,
        }
        per_claim: dict[str, list[float]] = {"new": [], "duplicate": []}
        seconds: dict[str, list[float]] = {"new": [], "duplicate": []}
        for batch in range(batches):
            offsets = pl.int_range(batch * claim_count, (batch + 1) * claim_count, eager=True)
            # Keys shaped like click ids, owner <partition>:<offset> (or, to compare, both as one integer, which
            # Redis stores as a number).
            keys = "c7f3a9-" + offsets.cast(pl.String)
            if integer_positions:
                positions = ((offsets % 3) * 2**40 + offsets).cast(pl.String)
            else:
                positions = (offsets % 3).cast(pl.String) + ":" + offsets.cast(pl.String)
            for kind in ("new", "duplicate"):
                before, _ = _cpu(client)
                started = time.perf_counter()
                owners = claims.claim(url, namespace, keys, positions, TTL_SECONDS, wait_seconds=10)
                seconds[kind].append(round(time.perf_counter() - started, 2))
                after, _ = _cpu(client)
                expected_new = claim_count if kind == "new" else 0
                if owners.null_count() != expected_new:
                    raise RuntimeError(f"{kind} batch {batch}: {owners.null_count()} new claims")
                per_claim[kind].append(round((after - before) / claim_count * 1e6, 2))
        wait_for_aof_rewrite(client)
        total = claim_count * batches
        persistence = client.info("persistence")
        figures["redis_cpu_us_per_new_claim"] = per_claim["new"]
        figures["redis_cpu_us_per_duplicate"] = per_claim["duplicate"]
        figures["seconds_per_batch"] = seconds
        figures["script_usec_per_call"] = client.info("commandstats").get("cmdstat_eval", {}).get("usec_per_call")
        figures["hashes"] = client.dbsize()
        figures["used_memory_bytes_per_claim"] = round((client.info("memory")["used_memory"] - memory_before) / total)
        figures["aof_rewrites"] = persistence.get("aof_rewrites", 0)
        figures["aof_rewrite_child_cpu_s"] = round(_cpu(client)[1], 2)
        if restart:
            pid, figures["restart_as_written"] = _restart(server, pid)
            client = redis.Redis(port=port)
            wait_for_aof_rewrite(client)
            client.bgrewriteaof()
            wait_for_aof_rewrite(client)
            pid, figures["restart_after_a_rewrite"] = _restart(server, pid)
        return figures
    finally:
        server.stop(pid)
        shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=int, default=1_000_000, help="claims per batch")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--port", type=int, default=16390, help="port of the scratch redis-server")
    parser.add_argument("--options", default="", help="extra redis-server options, e.g. '--appendfsync always'")
    parser.add_argument("--restart", action="store_true", help="also time restarts: as written, after a rewrite")
    parser.add_argument("--namespace", default="ce:dedup:ad_clicks", help="the claims' namespace (prefix:topic)")
    parser.add_argument("--integer-positions", action="store_true", help="owners as one integer, not p:o")
    parser.add_argument(
        "--previous-bucket", action="store_true", help="claims one TTL earlier first: the steady state's lookups"
    )
    args = parser.parse_args(argv)
    figures = measure(
        args.claims,
        args.batches,
        args.port,
        tuple(args.options.split()),
        args.restart,
        args.namespace,
        args.integer_positions,
        args.previous_bucket,
    )
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

"""A local Redis Cluster: N primaries as `redis-server` processes in cluster mode, on consecutive ports.

Each node persists like the stack's Redis (append-only file) in a folder of its own, with its cluster
configuration (`nodes.conf`) beside it, so a node restarted after a stop or a kill -9 rejoins with its
slots and its claims. The cluster is created once with `redis-cli --cluster create … --cluster-replicas 0`;
a later `start` of the same folder finds it formed and only waits for `cluster_state:ok`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clickhouse_etl.clients.redis_cluster import ClusterUrl
from clickhouse_etl.core.processes import process_alive
from clickhouse_etl.dev.redis_server import SERVER_OPTIONS, RedisServer, RedisStartError, log_tail

# Nodes of one machine see each other fail within this many milliseconds (Redis's default is 15 s).
NODE_TIMEOUT_MS = 3_000
STATE_FILE = "cluster.json"


def cluster_info(host: str, port: int, timeout: float = 2.0, password: str | None = None) -> dict[str, str]:
    """`CLUSTER INFO` of one node as a dict (empty when the node does not answer)."""
    import redis

    try:
        with redis.Redis(host=host, port=port, password=password, socket_timeout=timeout) as client:
            text = client.execute_command("CLUSTER INFO")
    except redis.RedisError:
        return {}
    if isinstance(text, dict):  # redis-py parses it already
        return {str(key): str(value) for key, value in text.items()}
    text = text.decode() if isinstance(text, bytes) else str(text)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def cluster_answers(url: str, timeout: float = 2.0) -> bool:
    """Some seed of the cluster URL answers and says the cluster is ok (every slot served)."""
    cluster = ClusterUrl.parse(url)
    return any(
        cluster_info(host, port, timeout, cluster.password).get("cluster_state") == "ok" for host, port in cluster.seeds
    )


@dataclass
class LocalRedisCluster:
    """`size` primaries on `first_port`, `first_port + 1`, … (cluster bus: port + 10000), files under `home`."""

    home: Path
    first_port: int
    size: int = 3
    host: str = "127.0.0.1"

    @property
    def ports(self) -> list[int]:
        return [self.first_port + i for i in range(self.size)]

    @property
    def url(self) -> str:
        """The REDIS_URL naming this cluster by all its nodes."""
        return "redis+cluster://" + ",".join(f"{self.host}:{port}" for port in self.ports)

    def node(self, port: int) -> RedisServer:
        options = (
            *SERVER_OPTIONS,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
        )
        return RedisServer(self.host, port, self.home / f"node-{port}", name=f"redis-{port}", options=options)

    # --- the pids this cluster started, kept beside it so a later process can stop them ---
    def pids(self) -> dict[int, int]:
        path = self.home / STATE_FILE
        return {int(port): pid for port, pid in json.loads(path.read_text()).items()} if path.exists() else {}

    def _record(self, port: int, pid: int | None) -> None:
        pids = self.pids()
        if pid is None:
            pids.pop(port, None)
        else:
            pids[port] = pid
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / STATE_FILE).write_text(json.dumps(pids))

    def start_node(self, port: int) -> int:
        node = self.node(port)
        pid = node.launch()
        self._record(port, pid)
        try:
            node.wait_ready(pid)
        except RedisStartError:
            self._record(port, None)
            raise
        return pid

    def stop_node(self, port: int, kill: bool = False) -> None:
        """Stop one node (SIGTERM, or SIGKILL with `kill`: no last write to its append-only file)."""
        pid = self.pids().get(port)
        if pid is None:
            return
        if kill:
            os.kill(pid, signal.SIGKILL)
            while process_alive(pid):
                time.sleep(0.01)
        else:
            self.node(port).stop(pid)
        self._record(port, None)

    def start(self, timeout: float = 60.0, echo: Callable[[str], None] = lambda _: None) -> str:
        """Start every node, create the cluster if it is new, wait for `cluster_state:ok`; return its URL."""
        try:
            for port in self.ports:
                if port not in self.pids():
                    self.start_node(port)
            if cluster_info(self.host, self.first_port).get("cluster_known_nodes") == "1":  # not formed yet
                self._create()
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        echo(f"redis cluster {self.url} ok, files in {self.home}")
        return self.url

    def _create(self) -> None:
        nodes = [f"{self.host}:{port}" for port in self.ports]
        _redis_cli_cluster(["create", *nodes, "--cluster-replicas", "0"], "redis-cli --cluster create", 120)

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every node says `cluster_state:ok` (all slots served and the nodes agree)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(cluster_info(self.host, port).get("cluster_state") == "ok" for port in self.ports):
                return
            time.sleep(0.1)
        states = {port: cluster_info(self.host, port).get("cluster_state", "down") for port in self.ports}
        logs = "\n".join(f"{self.node(p).log_path}:\n{log_tail(self.node(p).log_path, 8)}" for p in self.ports)
        raise RedisStartError(f"the Redis Cluster is not ok after {timeout:g} s: {states}\n{logs}")

    def node_id(self, port: int) -> str:
        import redis

        with redis.Redis(host=self.host, port=port) as client:
            answer = client.execute_command("CLUSTER MYID")
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def move_slots(self, source: int, target: int, count: int) -> None:
        """Move `count` slots, and their keys, from the node on port `source` to the one on `target`, as an
        operator does (`redis-cli --cluster reshard`): each slot migrating → keys MIGRATEd → owned by target."""
        _redis_cli_cluster(
            [
                "reshard",
                f"{self.host}:{source}",
                "--cluster-from",
                self.node_id(source),
                "--cluster-to",
                self.node_id(target),
                "--cluster-slots",
                str(count),
            ],
            f"moving {count} slots",
            300,
        )

    def stop(self) -> None:
        """Stop every node this cluster started (their files stay: a later start finds the same cluster)."""
        for port in list(self.pids()):
            self.stop_node(port)


def _redis_cli_cluster(arguments: list[str], what: str, timeout: float) -> None:
    """`redis-cli --cluster <arguments> --cluster-yes`; RedisStartError with its output if it fails."""
    command = ["redis-cli", "--cluster", *arguments, "--cluster-yes"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RedisStartError(f"{what} failed:\n{result.stdout[-2000:]}{result.stderr}")

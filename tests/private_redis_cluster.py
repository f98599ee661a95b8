"""A private Redis Cluster for a test session: three masters on free ports, stopped by pid."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any

from sagaline.testing import HarnessError, file_tail, free_port, wait_until
from tests.private_redis import find_redis_server
from tests.private_server import PrivateServer

# A cluster node also listens on its port + 10000 (the cluster bus).
BUS_OFFSET = 10000
SLOTS = 16384


def free_cluster_port(taken: set[int], tries: int = 50) -> int:
    """A free port whose cluster bus port is free too."""
    for _ in range(tries):
        port = free_port()
        if port + BUS_OFFSET > 65535 or port in taken or port + BUS_OFFSET in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + BUS_OFFSET))
            except OSError:
                continue
        return port
    raise HarnessError(f"no free port pair (port, port + {BUS_OFFSET}) in {tries} tries")


class PrivateRedisCluster(PrivateServer):
    """Three ``redis-server --cluster-enabled yes`` processes, in-memory, made one
    cluster of three masters (no replicas) with CLUSTER ADDSLOTS and CLUSTER MEET."""

    def __init__(self, *, masters: int = 3, ready_timeout: float = 60.0) -> None:
        self.ready_timeout = ready_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="sagaline-redis-cluster-"))
        self.ports: list[int] = []
        for _ in range(masters):
            self.ports.append(free_cluster_port(set(self.ports)))
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        try:
            self._start()
        except BaseException:
            self.destroy()
            raise

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:<first port>/``: the store's URL for this cluster."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}/"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _start(self) -> None:
        server = find_redis_server()
        for port in self.ports:
            node_dir = self.dir / str(port)
            node_dir.mkdir()
            log = open(node_dir / "redis.log", "ab")  # noqa: SIM115 - kept open while running
            self._logs.append(log)
            args = [
                server,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--dir", str(node_dir),
                "--daemonize", "no",
                "--save", "",
                "--appendonly", "no",
                "--protected-mode", "no",
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "5000",
            ]  # fmt: skip
            self._procs.append(
                subprocess.Popen(
                    args, stdout=log, stderr=subprocess.STDOUT, cwd=node_dir, start_new_session=True
                )
            )
        for port in self.ports:
            wait_until(
                lambda p=port: self._info(p) is not None,  # type: ignore[misc]
                timeout=self.ready_timeout,
                interval=0.05,
                what=f"redis cluster node on port {port}",
            )
        # What `redis-cli --cluster create` does: each node serves a third of the slots,
        # and the first one introduces the others (no redis-cli needed).
        share = -(-SLOTS // len(self.ports))
        for i, port in enumerate(self.ports):
            slots = range(i * share, min((i + 1) * share, SLOTS))
            self._command(port, "CLUSTER ADDSLOTS", *slots)
            self._command(port, "CLUSTER SET-CONFIG-EPOCH", i + 1)
        for port in self.ports[1:]:
            self._command(self.ports[0], "CLUSTER MEET", "127.0.0.1", port)
        # Every node must see the whole cluster before a client maps its slots.
        wait_until(
            lambda: all((self._info(p) or {}).get("cluster_state") == "ok" for p in self.ports),
            timeout=self.ready_timeout,
            interval=0.1,
            what="cluster_state:ok on every node",
        )

    def _command(self, port: int, *args: Any) -> Any:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def _info(self, port: int) -> dict[str, Any] | None:
        """CLUSTER INFO of one node, or None while it does not answer."""
        import redis

        for proc in self._procs:
            if proc.poll() is not None:
                log = self.dir / str(self.ports[self._procs.index(proc)]) / "redis.log"
                raise HarnessError(f"redis-server exited with {proc.returncode}:\n{file_tail(log)}")
        try:
            client = redis.Redis(
                host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1
            )
            try:
                info = client.execute_command("CLUSTER INFO")
                return dict(info) if isinstance(info, dict) else _parse_info(info)
            finally:
                client.close()
        except (redis.RedisError, OSError):
            return None

    def destroy(self) -> None:
        """Kill every node by pid and delete the cluster's directory."""
        for proc in self._procs:
            self._kill_process(proc)
        for log in self._logs:
            log.close()
        self._logs = []
        shutil.rmtree(self.dir, ignore_errors=True)


def _parse_info(raw: str | bytes) -> dict[str, Any]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

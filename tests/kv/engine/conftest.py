"""Fixtures for the KV engine tests: real redis-server processes (one server, and a 3-master +
3-replica Redis Cluster once per session) on 127.0.0.1 and free ports, and engines with unique
pool names in a private data dir whose pools are destroyed at teardown."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.helpers import destroy_pool_if_present, require_tool


def free_port(cluster: bool = False) -> int:
    """A free port on 127.0.0.1; for a cluster node, one <= 55535 whose bus port (+10000) is free too."""
    import random

    for _ in range(200):
        port = random.randint(20000, 55535) if cluster else 0
        try:
            with socket.socket() as sock, socket.socket() as bus:
                sock.bind(("127.0.0.1", port))
                if cluster:
                    bus.bind(("127.0.0.1", port + 10000))
                return sock.getsockname()[1]
        except OSError:
            continue
    raise RuntimeError("no free port")


def _ping(port: int | None = None, unix: str | None = None) -> bool:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, unix_socket_path=unix, socket_connect_timeout=0.2, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False
    finally:
        client.close()


class RedisServer:
    """A real redis-server child on a fixed port (restartable on the same port) and a unix socket."""

    def __init__(self, root: Path, cluster: bool = False, port: int | None = None) -> None:
        self.binary = require_tool("redis-server")
        self.port = port or free_port(cluster)
        self.dir = root / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.unix = str(self.dir / "redis.sock")
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), "--unixsocket", self.unix, "--unixsocketperm", "700", "--protected-mode", "yes"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000",
                     "--cluster-replica-validity-factor", "0"]  # a replica may always take over (test data)
        log = self.dir / "redis.log"
        with open(log, "ab") as handle:
            self.proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not _ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)


@pytest.fixture()
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


class RedisCluster:
    def __init__(self, nodes: list[RedisServer]) -> None:
        self.nodes = nodes

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes if n.proc is not None)

    def masters(self) -> list[RedisServer]:
        out = []
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                if node.client().info("replication")["role"] == "master":
                    out.append(node)
            except Exception:  # noqa: BLE001
                continue
        return out

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every live node reports cluster_state:ok with all 16384 slots served by 3 masters."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                infos = [n.client().cluster("info") for n in self.nodes if n.proc is not None]
                roles = [n.client().info("replication") for n in self.nodes if n.proc is not None]
                links_up = all(r.get("master_link_status", "up") == "up" for r in roles if r["role"] == "slave")
                healthy = all(i["cluster_state"] == "ok" and int(i["cluster_slots_ok"]) == 16384 for i in infos)
                if healthy and links_up and len(self.masters()) == 3:
                    return
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.2)
        raise RuntimeError("redis cluster did not become healthy")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A real 3-master + 3-replica cluster (`redis-cli --cluster create --cluster-replicas 1`)."""
    cli = require_tool("redis-cli")
    root = tmp_path_factory.mktemp("cluster")
    nodes = [RedisServer(root, cluster=True) for _ in range(6)]
    try:
        for node in nodes:
            node.start()  # (a start that fails still leaves the finally below to stop the others)
        addrs = [f"127.0.0.1:{n.port}" for n in nodes]
        subprocess.run([cli, "--cluster", "create", *addrs, "--cluster-replicas", "1", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        cluster = RedisCluster(nodes)
        cluster.wait_ok()
        yield cluster
    finally:
        for node in nodes:
            node.kill()


@pytest.fixture()
def make_engine(data_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """make_engine(**config) -> Engine with a unique pool (unless pool_name is given); closed and its
    pools destroyed afterwards. `disk=True` gives it tmp_path/disk."""
    from infercache.kv import Engine

    made: list[Any] = []
    pools: set[str] = set()

    def make(disk: bool = False, **kwargs: Any) -> Any:
        kwargs.setdefault("pool_name", f"t-eng-{uuid.uuid4().hex[:10]}")
        kwargs.setdefault("local_cpu_size", "8M")
        kwargs.setdefault("chunk_size", 4)
        kwargs.setdefault("data_dir", str(data_dir))
        if disk:
            kwargs.setdefault("local_disk", str(tmp_path / "disk"))
        engine = Engine(**kwargs)
        made.append(engine)
        pools.add(kwargs["pool_name"])
        return engine

    yield make
    for engine in made:
        engine.close()
    for name in pools:
        destroy_pool_if_present(name, data_dir)


def kv_for(n_tokens: int, layers: int = 2, hidden: int = 8, dtype: str = "float16", seed: int = 0) -> Any:
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, layers, n_tokens, hidden)).astype(dtype)


def needs_root_mount() -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tiny tmpfs needs root")


__all__ = ["RedisServer", "RedisCluster", "free_port", "kv_for", "needs_root_mount"]

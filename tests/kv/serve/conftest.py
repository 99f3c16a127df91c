"""Fixtures for the controller tests: a real `infercache kv serve` subprocess on a free port, and
engines in this process that share its hot pool (a real shared-memory pool under a unique name,
destroyed afterwards)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.helpers import destroy_pool_if_present

TOKEN = "test-token-1f2e"  # the server under test requires it (except /health)
CHUNK = 16


@dataclass
class ServerProc:
    """A running `infercache kv serve` subprocess."""

    proc: subprocess.Popen[str]
    url: str
    name: str  # model name = pool name = instance prefix
    data_dir: Path
    config: dict[str, Any]
    token: str | None
    output: list[str] = field(default_factory=list)

    @property
    def instance_id(self) -> str:
        return f"{self.name}@1@0"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str]:
        """Signal the server, wait for it; (exit code, everything it printed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode, "".join(self.output)

    _reader: threading.Thread = field(default=None, repr=False)  # type: ignore[assignment]


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[Any]:
    """A real Engine in this process: a private shared-memory pool (hot) and a disk tier."""
    from infercache.kv.engine import Engine
    from infercache.kv.pool import Pool

    name = f"t-eng-{uuid.uuid4().hex[:10]}"
    eng = Engine(**engine_settings(tmp_path, name))
    yield eng
    eng.close()
    Pool.destroy(name, data_dir=tmp_path / "data")


def engine_settings(root: Path, name: str, disk: bool = True) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "chunk_size": CHUNK, "model_name": name, "pool_name": name, "local_cpu_size": "16M",
        "data_dir": str(root / "data"),
    }  # fmt: skip
    if disk:
        cfg.update(local_disk=str(root / "disk"), local_disk_size="64M")
    return cfg


def start_server(root: Path, token: str | None = TOKEN, extra_args: tuple[str, ...] = (),
                 name: str | None = None, env: dict[str, str] | None = None) -> ServerProc:  # fmt: skip
    """Start `infercache kv serve --port 0` and wait for its "listening on" line."""
    import yaml

    name = name or f"t-srv-{uuid.uuid4().hex[:10]}"
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    cfg = engine_settings(root, name)
    cfg_path = root / "engine.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    args = [sys.executable, "-m", "infercache.cli.app", "kv", "serve", "--port", "0", "--config", str(cfg_path)]
    if token:
        args += ["--token", token]
    full_env = {k: v for k, v in os.environ.items() if k != "INFERCACHE_API_TOKEN"}
    full_env.update({"INFERCACHE_DATA_DIR": str(root / "data"), "COLUMNS": "250", **(env or {})})
    proc = subprocess.Popen([*args, *extra_args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=full_env)  # fmt: skip
    lines: "queue.Queue[str]" = queue.Queue()
    server = ServerProc(proc=proc, url="", name=name, data_dir=root / "data", config=cfg, token=token)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            server.output.append(line)
            lines.put(line)
        lines.put("")  # end of output: the process is gone

    server._reader = threading.Thread(target=read, daemon=True)
    server._reader.start()
    while True:
        try:
            line = lines.get(timeout=60)
        except queue.Empty:
            proc.kill()
            raise AssertionError("kv serve did not start in 60 s:\n" + "".join(server.output)) from None
        if "listening on " in line:
            server.url = line.split("listening on ", 1)[1].split()[0]
            return server
        if line == "":
            proc.wait(timeout=10)
            raise AssertionError(f"kv serve exited ({proc.returncode}):\n" + "".join(server.output))


def destroy_pool(name: str, data_dir: Path) -> None:
    destroy_pool_if_present(name, data_dir)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """One token-protected server for a test module (max 4096 tokens per request)."""
    srv = start_server(tmp_path_factory.mktemp("kvserve"), extra_args=("--max-tokens", "4096"))
    yield srv
    code, out = srv.stop()
    destroy_pool(srv.name, srv.data_dir)
    assert code == 0, out


@pytest.fixture()
def shared_engine(server: ServerProc) -> Iterator[Callable[..., Any]]:
    """make() -> an Engine in this process attached to the server's hot pool (no disk tier)."""
    from infercache.kv.config import EngineConfig
    from infercache.kv.engine import Engine

    made: list[Any] = []

    def make(**overrides: Any) -> Any:
        cfg = {k: v for k, v in server.config.items() if k not in ("local_disk", "local_disk_size")}
        engine = Engine(EngineConfig(**{**cfg, **overrides}))
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def random_kv(num_tokens: int, layers: int = 2, hidden: int = 32, seed: int = 0) -> Any:
    import numpy as np

    return np.random.default_rng(seed).standard_normal((2, layers, num_tokens, hidden)).astype(np.float32)


def unique_tokens(n: int, seed: int) -> list[int]:
    import numpy as np

    return [int(t) for t in np.random.default_rng(seed).integers(0, 50_000, size=n)]


__all__ = ["ServerProc", "start_server", "destroy_pool", "random_kv", "unique_tokens", "TOKEN", "CHUNK", "signal"]

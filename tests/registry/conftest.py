"""Real registries for the interop tests: Debian's `docker-registry` (distribution 2.8).

Each fixture starts the real binary on 127.0.0.1 with a free port and temp
storage, waits for `GET /v2/`, and stops it at the end of the session.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import socket
import ssl
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import require_tool

USER = "alice"
PASSWORD = "s3cret-Pa55word"


@dataclass(frozen=True)
class Registry:
    host: str  # 127.0.0.1:PORT
    root: Path
    log: Path
    scheme: str = "http"
    cert: Path | None = None

    def ref(self, repo: str, tag: str = "latest") -> str:
        return f"docker://{self.host}/{repo}:{tag}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, ok: tuple[int, ...]) -> None:
    context = ssl._create_unverified_context()  # noqa: S323 - the fixture's own self-signed cert
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as reply:  # noqa: S310
                if reply.status in ok:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code in ok:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"docker-registry did not answer {url}: {log.read_text()[-2000:]}")


def _start(root: Path, extra: dict[str, object] | None = None, tls: tuple[Path, Path] | None = None) -> Iterator[Registry]:
    binary = require_tool("docker-registry")
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    http: dict[str, object] = {"addr": f"127.0.0.1:{port}", "secret": "infercache-tests"}
    if tls:
        http["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    config = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}, "delete": {"enabled": True}},
        "http": http,
        **(extra or {}),
    }
    cfg = root / "config.yml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    log = root / "registry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "serve", str(cfg)], stdout=out, stderr=subprocess.STDOUT)
    scheme = "https" if tls else "http"
    try:
        _wait_ready(f"{scheme}://127.0.0.1:{port}/v2/", proc, log, (200, 401))
        yield Registry(f"127.0.0.1:{port}", root, log, scheme, tls[0] if tls else None)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A real registry without auth on plain HTTP (loopback)."""
    yield from _start(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A real registry with htpasswd (bcrypt) basic auth: user `alice`."""
    htpasswd = require_tool("htpasswd", "apache2-utils")
    root = tmp_path_factory.mktemp("auth-registry")
    entry = subprocess.run([htpasswd, "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True).stdout
    (root / "htpasswd").write_text(entry)
    extra = {"auth": {"htpasswd": {"realm": "infercache-test", "path": str(root / "htpasswd")}}}
    yield from _start(root, extra)


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A real registry on HTTPS with a self-signed certificate (made by openssl)."""
    openssl = require_tool("openssl")
    root = tmp_path_factory.mktemp("tls-registry")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    yield from _start(root, tls=(cert, key))


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def make_tiny_layout(layout: Path, tag: str = "v1", payload: bytes = b"hello", labels: dict[str, str] | None = None,
                     docker: bool = False) -> Path:
    """A minimal valid image written by hand (independent of our packer): one gzip layer, labels.

    Used to test the transport alone; the packer's own images are tested in the round trip.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("io.triton.cache/hello.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    tar_bytes = buf.getvalue()
    layer_bytes = gzip.compress(tar_bytes, mtime=0)
    layer = _blob(layout, layer_bytes)
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Labels": labels or {"model.cache.image/type": "triton"}},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar_bytes).hexdigest()]},
    }
    cfg = _blob(layout, json.dumps(config).encode())
    if docker:
        cfg_type, layer_type = "application/vnd.docker.container.image.v1+json", "application/vnd.docker.image.rootfs.diff.tar.gzip"
        man_type = "application/vnd.docker.distribution.manifest.v2+json"
    else:
        cfg_type, layer_type = "application/vnd.oci.image.config.v1+json", "application/vnd.oci.image.layer.v1.tar+gzip"
        man_type = "application/vnd.oci.image.manifest.v1+json"
    manifest = {
        "schemaVersion": 2, "mediaType": man_type,
        "config": {"mediaType": cfg_type, **cfg},
        "layers": [{"mediaType": layer_type, **layer}],
    }
    man = _blob(layout, json.dumps(manifest).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": man_type, **man, "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (layout / "index.json").write_text(json.dumps(index))
    return layout


def skopeo(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = require_tool("skopeo")
    result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} failed: {result.stderr}")
    return result


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, object]]:
    """A real registry in bearer-token mode, with tests/registry/token_server.py as its auth service."""
    from tests.registry.token_server import ISSUER, SERVICE, TokenServer

    openssl = require_tool("openssl")
    root = tmp_path_factory.mktemp("token-registry")
    cert, key = root / "token-cert.pem", root / "token-key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=token-issuer",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    tokens = TokenServer(openssl, cert, key, USER, PASSWORD)
    extra = {"auth": {"token": {"realm": tokens.realm, "service": SERVICE, "issuer": ISSUER,
                                "rootcertbundle": str(cert)}}}
    try:
        for reg in _start(root, extra):
            yield reg, tokens
    finally:
        tokens.close()


@pytest.fixture()
def fresh_blob_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which repositories this process saw blobs in (no cross-repo mounts from earlier tests)."""
    import infercache.vault.registry_client as client

    monkeypatch.setattr(client, "_SEEN_BLOBS", {})

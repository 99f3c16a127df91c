"""Registry transfers: our docker:// transport next to skopeo, both against a real local registry.

    .venv/bin/python bench/registry.py [--quick]      (or INFERCACHE_BENCH_QUICK=1)

Makes a hand-written OCI layout with one incompressible layer of 256 MiB (64 MiB with --quick),
starts Debian's docker-registry on 127.0.0.1 (a fresh one per measurement, so neither tool can
cross-repo mount a blob the other pushed) and times, each next to skopeo 1.9 doing the same in the
same run:
- push (oci: → docker://) in MB/s;
- re-push of the unchanged image (every blob already there: HEAD-skip) in seconds;
- pull (docker:// → oci:) in MB/s.
Target: within 1.5x of skopeo's time for push and pull; re-push well under one second.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from infercache.vault.copy import copy_image  # noqa: E402

SKOPEO = shutil.which("skopeo") or "/usr/bin/skopeo"
REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def make_layout(root: Path, size: int) -> Path:
    """One raw-tar layer of random bytes (content type is irrelevant to the transfer), config, manifest."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    hasher = hashlib.sha256()
    tmp = root / "layer.tmp"
    with open(tmp, "wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(8 << 20, left))
            hasher.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    layer_digest = hasher.hexdigest()
    tmp.rename(blobs / layer_digest)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Labels": {"bench": "1"}},
                         "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]}}).encode()
    config_digest = hashlib.sha256(config).hexdigest()
    (blobs / config_digest).write_bytes(config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": f"sha256:{config_digest}",
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": f"sha256:{layer_digest}",
                    "size": size}],
    }).encode()
    manifest_digest = hashlib.sha256(manifest).hexdigest()
    (blobs / manifest_digest).write_bytes(manifest)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{manifest_digest}",
        "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
    return root


@contextmanager
def registry(base: Path) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(tempfile.mkdtemp(dir=base, prefix="reg-"))
    cfg = root / "cfg.yml"
    cfg.write_text(json.dumps({"version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
                               "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
                               "http": {"addr": f"127.0.0.1:{port}", "secret": "bench"}}))
    proc = subprocess.Popen([REGISTRY, "serve", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1):  # noqa: S310
                    break
            except OSError:
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def timed(func) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def skopeo(*args: str) -> None:
    subprocess.run([SKOPEO, *args], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("INFERCACHE_BENCH_QUICK") == "1")
    args = parser.parse_args()
    size = (64 if args.quick else 256) << 20
    mb = size / 1e6
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp:
        base = Path(tmp)
        layout = make_layout(base / "layout", size)
        src = f"oci:{layout}:v1"
        print(f"image: one {size >> 20} MiB incompressible layer; registry: docker-registry on 127.0.0.1")

        results = {}
        for tool in ("skopeo", "infercache"):
            with registry(base) as host:
                ref = f"docker://{host}/bench/img:v1"
                if tool == "skopeo":
                    push = timed(lambda: skopeo("copy", "--dest-tls-verify=false", src, ref))
                    repush = timed(lambda: skopeo("copy", "--dest-tls-verify=false", src, ref))
                    out = base / "pull-skopeo"
                    pull = timed(lambda: skopeo("copy", "--src-tls-verify=false", ref, f"oci:{out}:v1"))
                else:
                    push = timed(lambda: copy_image(src, ref))
                    repush = timed(lambda: copy_image(src, ref))
                    out = base / "pull-ours"
                    pull = timed(lambda: copy_image(ref, f"oci:{out}:v1"))
                results[tool] = (push, repush, pull)
        ours, theirs = results["infercache"], results["skopeo"]
        print(f"{'':16}{'infercache':>14}{'skopeo (baseline)':>20}{'ratio':>8}")
        print(f"{'push MB/s':16}{mb / ours[0]:14.1f}{mb / theirs[0]:20.1f}{ours[0] / theirs[0]:7.2f}x")
        print(f"{'re-push s':16}{ours[1]:14.3f}{theirs[1]:20.3f}{ours[1] / theirs[1]:7.2f}x")
        print(f"{'pull MB/s':16}{mb / ours[2]:14.1f}{mb / theirs[2]:20.1f}{ours[2] / theirs[2]:7.2f}x")
        print("(ratio = our time / skopeo's time; < 1 is faster)")


if __name__ == "__main__":
    main()

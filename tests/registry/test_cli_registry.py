"""`infercache vault` commands against real registries, run as a user would (subprocess)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tests.helpers import run_cli
from tests.registry.conftest import PASSWORD, USER, Registry, make_tiny_layout, skopeo
from tests.registry.proxy import FaultyProxy


def _env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"HOME": str(home), "REGISTRY_AUTH_FILE": "", "XDG_RUNTIME_DIR": "", "DOCKER_CONFIG": ""}


def test_vault_copy_with_creds_and_wrong_creds(auth_registry: Registry, tmp_path: Path) -> None:
    layout = make_tiny_layout(tmp_path / "img")
    env = _env(tmp_path)
    wrong = "Definitely-Wr0ng"
    bad = run_cli("-vvv", "vault", "copy", f"oci:{layout}:v1", auth_registry.ref("cli/img", "v1"),
                  "--creds", f"{USER}:{wrong}", env=env)
    assert bad.returncode == 1
    assert "authentication" in bad.stderr and USER in bad.stderr
    assert wrong not in bad.stdout + bad.stderr
    assert base64.b64encode(f"{USER}:{wrong}".encode()).decode() not in bad.stdout + bad.stderr
    good = run_cli("-vvv", "vault", "copy", f"oci:{layout}:v1", auth_registry.ref("cli/img", "v1"),
                   "--creds", f"{USER}:{PASSWORD}", env=env)
    assert good.returncode == 0, good.stderr
    assert PASSWORD not in good.stdout + good.stderr
    # docker's config.json under $HOME is found without any flag
    docker_cfg = Path(env["HOME"]) / ".docker" / "config.json"
    docker_cfg.parent.mkdir()
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    docker_cfg.write_text(json.dumps({"auths": {f"https://{auth_registry.host}": {"auth": token}}}))
    inspect = run_cli("vault", "inspect", auth_registry.ref("cli/img", "v1"), "--format", "json", env=env)
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["labels"]["model.cache.image/type"] == "triton"


def test_vault_tls_flag(tls_registry: Registry, tmp_path: Path) -> None:
    layout = make_tiny_layout(tmp_path / "img")
    env = {**_env(tmp_path), "REQUESTS_CA_BUNDLE": "", "SSL_CERT_FILE": ""}
    refused = run_cli("vault", "copy", f"oci:{layout}:v1", tls_registry.ref("cli/tls", "v1"), env=env)
    assert refused.returncode == 1 and "--no-tls-verify" in refused.stderr
    ok = run_cli("vault", "copy", f"oci:{layout}:v1", tls_registry.ref("cli/tls", "v1"), "--no-tls-verify", env=env)
    assert ok.returncode == 0, ok.stderr
    info = skopeo("inspect", "--tls-verify=false", tls_registry.ref("cli/tls", "v1"))
    assert json.loads(info.stdout)["Labels"]["model.cache.image/type"] == "triton"


def test_vault_copy_survives_flaky_registry(registry: Registry, tmp_path: Path) -> None:
    layout = make_tiny_layout(tmp_path / "img", payload=b"flaky cli")
    faults = {1: "503", 3: "reset", 5: "502"}
    env = {**_env(tmp_path), "INFERCACHE_REGISTRY_BACKOFF": "0.01"}
    with FaultyProxy(registry.host, lambda _m, _p, n: faults.get(n)) as proxy:
        result = run_cli("vault", "copy", f"oci:{layout}:v1", f"docker://{proxy.host}/cli/flaky:v1", env=env)
    assert result.returncode == 0, result.stderr
    assert proxy.count("503") == 1 and proxy.count("reset") == 1 and proxy.count("502") == 1
    assert json.loads(skopeo("inspect", "--tls-verify=false", registry.ref("cli/flaky", "v1")).stdout)["Digest"]


def test_vault_unpack_from_registry_needs_target(registry: Registry, triton_cache: Path, tmp_path: Path) -> None:
    ref = registry.ref("cli/triton", "v1")
    packed = run_cli("vault", "pack", str(triton_cache), ref)
    assert packed.returncode == 0, packed.stderr
    out = tmp_path / "out"
    result = run_cli("vault", "unpack", ref, "--dest", str(out), "--target", "cuda:80")
    assert result.returncode == 0, result.stderr
    assert len([p for p in out.iterdir() if p.is_dir()]) == 6  # 3 kernels x 2 warps for cuda:80

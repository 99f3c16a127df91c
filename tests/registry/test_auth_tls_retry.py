"""Credentials, TLS verification and retries against real registries.

Auth and TLS use real docker-registry instances (htpasswd/bcrypt; a self-signed
certificate from openssl). Faults (5xx, resets, cut downloads) come from the
small proxy in proxy.py, since a healthy registry does not produce them.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest

from infercache.vault.auth import AuthenticationError, lookup_credentials
from infercache.vault.reference import ImageReference, RegistryOptions
from infercache.vault.registry import RegistrySource
from infercache.vault.registry_http import RegistryError, RetryPolicy
from tests.registry.conftest import PASSWORD, USER, Registry, make_tiny_layout, skopeo
from tests.registry.proxy import FaultyProxy
from tests.registry.test_transport import pull_all, push_layout

FAST = RetryPolicy(attempts=4, backoff_s=0.01)


def _authfile(path: Path, host: str, user: str, password: str, style: str = "auth") -> Path:
    entry = ({"auth": base64.b64encode(f"{user}:{password}".encode()).decode()} if style == "auth"
             else {"username": user, "password": password})
    path.write_text(json.dumps({"auths": {host: entry}}))
    return path


@pytest.fixture()
def no_ambient_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolate from the machine's own auth files."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    return home


# -- auth -------------------------------------------------------------------------


def test_creds_push_and_pull(auth_registry: Registry, tmp_path: Path, no_ambient_auth: Path) -> None:
    layout = make_tiny_layout(tmp_path / "img", payload=b"secret cache")
    opts = RegistryOptions(creds=f"{USER}:{PASSWORD}")
    push_layout(layout, "v1", auth_registry.ref("auth/img", "v1"), options=opts)
    manifest, blobs = pull_all(auth_registry.ref("auth/img", "v1"), options=opts)
    assert manifest["layers"][0]["digest"] in blobs
    info = skopeo("inspect", "--tls-verify=false", "--creds", f"{USER}:{PASSWORD}", auth_registry.ref("auth/img", "v1"))
    assert json.loads(info.stdout)["Labels"]["model.cache.image/type"] == "triton"


@pytest.mark.parametrize("style", ["auth", "userpass"])
def test_authfile(auth_registry: Registry, tmp_path: Path, no_ambient_auth: Path, style: str) -> None:
    layout = make_tiny_layout(tmp_path / "img")
    authfile = _authfile(tmp_path / "auth.json", auth_registry.host, USER, PASSWORD, style)
    push_layout(layout, "v1", auth_registry.ref("auth/file", style), options=RegistryOptions(authfile=authfile))


def test_auth_file_search_order(auth_registry: Registry, tmp_path: Path, no_ambient_auth: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """REGISTRY_AUTH_FILE beats XDG_RUNTIME_DIR beats ~/.docker/config.json; --creds beats all."""
    host = auth_registry.host
    docker_cfg = no_ambient_auth / ".docker" / "config.json"
    docker_cfg.parent.mkdir()
    _authfile(docker_cfg, f"https://{host}", "docker-user", "pw1")
    assert lookup_credentials(host).username == "docker-user"  # type: ignore[union-attr]
    xdg = tmp_path / "xdg"
    (xdg / "containers").mkdir(parents=True)
    _authfile(xdg / "containers" / "auth.json", host, "xdg-user", "pw2")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert lookup_credentials(host).username == "xdg-user"  # type: ignore[union-attr]
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(_authfile(tmp_path / "r.json", host, "env-user", "pw3")))
    assert lookup_credentials(host).username == "env-user"  # type: ignore[union-attr]
    assert lookup_credentials(host, creds="cli-user:pw4").username == "cli-user"  # type: ignore[union-attr]
    assert lookup_credentials("other.example:5000") is None
    # a namespaced key is preferred for its repository
    ns = tmp_path / "ns.json"
    ns.write_text(json.dumps({"auths": {
        host: {"username": "host-user", "password": "a"},
        f"{host}/team": {"username": "team-user", "password": "b"}}}))
    assert lookup_credentials(host, "team/img", authfile=ns).username == "team-user"  # type: ignore[union-attr]
    assert lookup_credentials(host, "other/img", authfile=ns).username == "host-user"  # type: ignore[union-attr]


def test_wrong_password_is_a_clear_error_without_the_password(
    auth_registry: Registry, tmp_path: Path, no_ambient_auth: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    layout = make_tiny_layout(tmp_path / "img")
    wrong = "Wr0ng-Passw0rd-xyz"
    with pytest.raises(AuthenticationError) as info:
        push_layout(layout, "v1", auth_registry.ref("auth/wrong", "v1"), options=RegistryOptions(creds=f"{USER}:{wrong}"))
    message = str(info.value)
    assert "authentication" in message and USER in message and "--creds" in message
    assert wrong not in message
    basic = base64.b64encode(f"{USER}:{wrong}".encode()).decode()
    assert wrong not in caplog.text and basic not in caplog.text


def test_no_credentials_says_how_to_give_them(auth_registry: Registry, no_ambient_auth: Path) -> None:
    with pytest.raises(AuthenticationError, match="--creds"):
        RegistrySource(ImageReference.parse(auth_registry.ref("auth/img", "v1"))).get_manifest()


def test_credentials_never_logged_at_debug(
    auth_registry: Registry, tmp_path: Path, no_ambient_auth: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # root, urllib3 and ours
    layout = make_tiny_layout(tmp_path / "img", payload=b"log check")
    opts = RegistryOptions(creds=f"{USER}:{PASSWORD}")
    dest, _ = push_layout(layout, "v1", auth_registry.ref("auth/logs", "v1"), options=opts)
    pull_all(auth_registry.ref("auth/logs", "v1"), options=opts)
    assert caplog.records, "expected debug logging to be captured"
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert PASSWORD not in caplog.text and basic not in caplog.text
    assert "/blobs/uploads/" in caplog.text and "_state=" not in caplog.text  # upload state is redacted
    assert PASSWORD not in repr(opts) and PASSWORD not in repr(dest.client)


# -- TLS --------------------------------------------------------------------------


def test_self_signed_tls_refused_by_default(tls_registry: Registry, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    layout = make_tiny_layout(tmp_path / "img")
    with pytest.raises(RegistryError, match="--no-tls-verify"):
        push_layout(layout, "v1", tls_registry.ref("tls/img", "v1"))


def test_no_tls_verify_and_ca_bundle(tls_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = make_tiny_layout(tmp_path / "img")
    dest, _ = push_layout(layout, "v1", tls_registry.ref("tls/img", "v1"), options=RegistryOptions(tls_verify=False))
    assert dest.client.base_url().startswith("https://")  # TLS, just unverified: never downgraded
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_registry.cert))
    manifest, _ = pull_all(tls_registry.ref("tls/img", "v1"))  # verified against the given CA
    assert manifest["schemaVersion"] == 2


def test_plain_http_only_on_loopback_or_when_allowed(registry: Registry, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Were the plain-HTTP registry not on loopback, default settings would refuse it."""
    import infercache.vault.registry_client as client

    monkeypatch.setattr(client, "is_loopback", lambda host: False)
    layout = make_tiny_layout(tmp_path / "img")
    with pytest.raises(RegistryError, match="does not speak HTTPS.*--no-tls-verify"):
        push_layout(layout, "v1", registry.ref("tls/plain", "v1"))
    dest, _ = push_layout(layout, "v1", registry.ref("tls/plain", "v1"), options=RegistryOptions(tls_verify=False))
    assert dest.client.base_url().startswith("http://")


def test_unreachable_registry_is_retried_then_reported() -> None:
    src = RegistrySource(ImageReference.parse(f"docker://127.0.0.1:{_closed_port()}/x/y:z"),
                         retry=RetryPolicy(attempts=2, backoff_s=0.01))
    with pytest.raises(RegistryError, match="after 2 attempts.*cannot connect"):
        src.get_manifest()
    assert src.client.stats.retries == 1


def _closed_port() -> int:
    from tests.registry.conftest import free_port

    return free_port()  # nothing listens there once the probe socket is closed


# -- retries ----------------------------------------------------------------------


def test_retries_on_5xx_and_resets(registry: Registry, tmp_path: Path) -> None:
    faults = {1: "503", 2: "502", 4: "reset", 7: "500"}
    layout = make_tiny_layout(tmp_path / "img", payload=b"flaky network")
    with FaultyProxy(registry.host, lambda _m, _p, n: faults.get(n)) as proxy:
        dest, digest = push_layout(layout, "v1", f"docker://{proxy.host}/retry/img:v1", retry=FAST)
    assert dest.client.stats.retries >= 4
    assert {what for _m, _p, what in proxy.log} >= {"503", "502", "reset", "500"}
    info = json.loads(skopeo("inspect", "--tls-verify=false", registry.ref("retry/img", "v1")).stdout)
    assert info["Digest"] == digest


def test_gives_up_after_attempts(registry: Registry, tmp_path: Path) -> None:
    layout = make_tiny_layout(tmp_path / "img")
    with FaultyProxy(registry.host, lambda m, _p, _n: "503" if m == "PUT" else None) as proxy:
        with pytest.raises(RegistryError, match="after 4 attempts"):
            push_layout(layout, "v1", f"docker://{proxy.host}/retry/never:v1", retry=FAST)
    assert proxy.count("503") == 4


def test_client_errors_are_not_retried(registry: Registry, tmp_path: Path) -> None:
    layout = make_tiny_layout(tmp_path / "img")
    with FaultyProxy(registry.host, lambda m, p, _n: "400" if "/manifests/" in p else None) as proxy:
        with pytest.raises(RegistryError, match="HTTP 400"):
            push_layout(layout, "v1", f"docker://{proxy.host}/retry/bad:v1", retry=FAST)
    assert proxy.count("400") == 1


def test_cut_download_resumes_with_range(registry: Registry, tmp_path: Path) -> None:
    payload = __import__("random").Random(1).randbytes(50_000)
    layout = make_tiny_layout(tmp_path / "img", payload=payload)
    push_layout(layout, "v1", registry.ref("retry/cut", "v1"))
    cut_once: list[int] = []

    def rule(method: str, path: str, _n: int) -> str | None:
        if method == "GET" and "/blobs/" in path and not cut_once:
            cut_once.append(1)
            return "cut"
        return None

    with FaultyProxy(registry.host, rule) as proxy:
        src = RegistrySource(ImageReference.parse(f"docker://{proxy.host}/retry/cut:v1"), retry=FAST)
        manifest, blobs = pull_all(f"docker://{proxy.host}/retry/cut:v1", retry=FAST)
    assert proxy.count("cut") == 1
    assert any("Range" in h for h in proxy.headers_seen)
    for item in [manifest["config"], *manifest["layers"]]:
        assert len(blobs[item["digest"]]) == item["size"]
    src.close()


# -- bearer tokens ------------------------------------------------------------------


def test_bearer_token_flow(token_registry: tuple[Registry, object], tmp_path: Path, no_ambient_auth: Path,
                           caplog: pytest.LogCaptureFixture) -> None:
    """The real registry in token mode: 401 Bearer challenge → token service → verified JWT."""
    caplog.set_level(logging.DEBUG)
    reg, tokens = token_registry
    layout = make_tiny_layout(tmp_path / "img", payload=b"bearer")
    opts = RegistryOptions(creds=f"{USER}:{PASSWORD}")
    dest, digest = push_layout(layout, "v1", reg.ref("tok/img", "v1"), options=opts)
    assert "repository:tok/img:pull,push" in tokens.scopes  # type: ignore[attr-defined]
    src = RegistrySource(ImageReference.parse(reg.ref("tok/img", "v1")), opts)
    src.get_manifest()
    assert src.digest == digest
    assert "repository:tok/img:pull" in tokens.scopes  # type: ignore[attr-defined]
    assert PASSWORD not in caplog.text
    # a cross-repository mount needs one token for two scopes
    from infercache.vault.copy import copy_image

    mounted = copy_image(reg.ref("tok/img", "v1"), reg.ref("tok/other", "v1"), src_options=opts, dst_options=opts)
    assert mounted.blobs_copied == 0 and mounted.blobs_skipped == 2
    assert "repository:tok/other:pull,push" in tokens.scopes and "repository:tok/img:pull" in tokens.scopes  # type: ignore[attr-defined]
    with pytest.raises(AuthenticationError, match="failed as user"):
        RegistrySource(ImageReference.parse(reg.ref("tok/img", "v1")),
                       RegistryOptions(creds=f"{USER}:nope")).get_manifest()


def test_credential_helper(auth_registry: Registry, tmp_path: Path, no_ambient_auth: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """credHelpers in an auth file: `docker-credential-NAME get` is asked (a stand-in helper script,
    as no real credential store runs here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-infercachetest"
    helper.write_text("#!/bin/sh\nread host\n"
                      f"[ \"$host\" = \"{auth_registry.host}\" ] || exit 1\n"
                      f"printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}' \"$host\"\n")
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    authfile = tmp_path / "auth.json"
    authfile.write_text(json.dumps({"auths": {}, "credHelpers": {auth_registry.host: "infercachetest"}}))
    creds = lookup_credentials(auth_registry.host, authfile=authfile)
    assert creds is not None and creds.username == USER and "docker-credential-infercachetest" in creds.source
    layout = make_tiny_layout(tmp_path / "img")
    push_layout(layout, "v1", auth_registry.ref("auth/helper", "v1"), options=RegistryOptions(authfile=authfile))


def test_cut_manifest_is_refetched(registry: Registry, tmp_path: Path) -> None:
    layout = make_tiny_layout(tmp_path / "img")
    _dest, digest = push_layout(layout, "v1", registry.ref("retry/cutman", "v1"))
    cut: list[int] = []

    def rule(method: str, path: str, _n: int) -> str | None:
        if method == "GET" and "/manifests/" in path and not cut:
            cut.append(1)
            return "cut"
        return None

    with FaultyProxy(registry.host, rule) as proxy:
        src = RegistrySource(ImageReference.parse(f"docker://{proxy.host}/retry/cutman:v1"), retry=FAST)
        src.get_manifest()
    assert proxy.count("cut") == 1 and src.digest == digest and src.client.stats.retries == 1


@pytest.mark.parametrize("host,loopback", [
    ("localhost", True), ("localhost:5000", True), ("127.0.0.1:5000", True), ("127.1.2.3", True),
    ("[::1]:5000", True), ("[::1]", True),
    ("localhost.example.com", False), ("localhost.example.com:5000", False), ("127.example.com", False),
    ("127.0.0.1.nip.io:443", False), ("registry.example.com:5000", False), ("10.0.0.1", False),
])
def test_is_loopback_matches_whole_host_names_only(host: str, loopback: bool) -> None:
    """Plain HTTP without --no-tls-verify is allowed only on loopback: a prefix match would let
    `localhost.attacker.net` be downgraded silently."""
    from infercache.net import is_loopback

    assert is_loopback(host) is loopback


@pytest.mark.parametrize(("realm", "verify", "refused"), [
    ("http://auth.invalid/token", True, True),
    ("http://auth.invalid/token", False, False),
    ("http://127.0.0.1:1/token", True, False),
])
def test_credentials_never_sent_to_a_plain_http_token_service(realm: str, verify: bool, refused: bool) -> None:
    """A registry may name any token service: with TLS verification on, a plain-HTTP one off loopback
    never gets the password (refused before any request). Otherwise the request is made (and fails
    here: nothing listens), which shows the credentials were not what stopped it."""
    import requests

    from infercache.vault.auth import Challenge, RegistryAuth

    auth = RegistryAuth(requests.Session(), "registry.example.com", "a/b", f"{USER}:{PASSWORD}", None, verify=verify)
    challenge = Challenge("bearer", realm, "svc", "repository:a/b:pull")
    with pytest.raises(AuthenticationError) as info:
        auth._fetch_token(challenge, ["repository:a/b:pull"])  # noqa: SLF001
    assert ("is not HTTPS" in str(info.value)) is refused
    assert PASSWORD not in str(info.value)

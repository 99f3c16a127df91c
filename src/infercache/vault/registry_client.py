"""A Distribution-spec v2 registry client: one repository, auth, retries, verified transfers.

Push: ``HEAD`` each blob and skip what the registry has, upload the rest
monolithically (``POST`` + ``PUT``) or in ``PATCH`` chunks when larger than
``chunk_size``, then ``PUT`` the manifest. Pull: ``GET`` the manifest with an
``Accept`` for OCI and Docker types (an index is resolved to one image
manifest), stream blobs and verify digest and size.

Why the HTTP is hand-written on ``requests`` (which comes with oras-py) rather
than ``oras.provider.Registry``: oras' ``put_upload`` reads the whole blob into
memory; ``upload_manifest`` re-serialises the manifest (changing its digest) and
always sends the OCI media type; ``get_manifest`` returns parsed JSON (no raw
bytes to verify a digest against); its retry decorator sleeps 3**n seconds,
retries only HTTP 500 and also retries authentication failures. We use oras'
``Container`` for the v2 URL layout and its ``WWW-Authenticate`` parser.

Transport security: HTTPS first. Plain HTTP is allowed only when TLS
verification is off or the registry is on the loopback interface (docker's own
default), never as a silent downgrade after a certificate failure.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any, BinaryIO, Callable
from urllib.parse import urlencode, urljoin

from infercache import __version__
from infercache.errors import BadInputError, InfercacheError
from infercache.net import is_loopback
from infercache.vault.auth import NO_NETRC, AuthenticationError, RegistryAuth
from infercache.vault.image import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MAX_DOCUMENT_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
    sha256_digest,
)
from infercache.vault.reference import (
    DOCKER_HUB_ALIASES,
    DOCKER_HUB_API,
    Descriptor,
    ImageReference,
    RegistryOptions,
)
from infercache.vault.registry_http import (
    RETRY_STATUSES,
    FileSlice,
    RegistryError,
    RegistryStats,
    Retryable,
    RetryPolicy,
    env_retry_policy,
    error_text,
    install_redaction,
    path_of,
    read_limited,
    verified_download,
    verified_seekable,
)

if TYPE_CHECKING:  # pragma: no cover
    import requests

log = logging.getLogger(__name__)

ACCEPT = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST))


# Where this process has seen each blob: (registry, repository) by digest. Lets a push to
# another repository of the same registry mount the blob instead of uploading it again
# (what skopeo's blob-info cache does, kept in memory only).
_SEEN_BLOBS: dict[str, set[tuple[str, str]]] = {}


def remember_blob(digest: str, registry: str, repository: str) -> None:
    _SEEN_BLOBS.setdefault(digest, set()).add((registry, repository))


class RegistryClient:
    """One repository on one registry, with auth, retries and verified transfers."""

    def __init__(
        self,
        reference: ImageReference,
        options: RegistryOptions | None = None,
        *,
        retry: RetryPolicy | None = None,
        chunk_size: int = 64 << 20,
        timeout: tuple[float, float] = (15.0, 300.0),
    ) -> None:
        if reference.transport != "docker" or not reference.registry or not reference.repository:
            raise BadInputError(f"not a registry reference: {reference}")
        import requests
        from oras.container import Container

        self.reference = reference
        self.options = options or RegistryOptions()
        self.retry = retry or env_retry_policy()
        self.chunk_size = max(1 << 10, chunk_size)
        self.timeout = timeout
        self.stats = RegistryStats()
        # docker.io names the registry's UI; the API lives elsewhere.
        self.host = DOCKER_HUB_API if reference.registry in DOCKER_HUB_ALIASES else reference.registry
        self._container = Container(f"{self.host}/{reference.repository}")
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"infercache/{__version__}"
        self._verify: bool = self.options.tls_verify
        self._auth = RegistryAuth(
            self._session, reference.registry, reference.repository, self.options.creds, self.options.authfile,
            verify=self._verify,
        )
        self._base: str | None = None
        install_redaction()
        if not self._verify:
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

    def __repr__(self) -> str:
        return f"RegistryClient({self.reference})"

    # -- connection and requests -------------------------------------------------

    @property
    def pull_scope(self) -> str:
        return f"repository:{self.reference.repository}:pull"

    @property
    def push_scope(self) -> str:
        return f"repository:{self.reference.repository}:pull,push"

    def base_url(self) -> str:
        """``https://host`` or, where allowed, ``http://host``; found once with ``GET /v2/``."""
        if self._base is None:
            self._base = self._with_retries("GET /v2/", self._probe)
        return self._base

    def _probe(self) -> str:
        import requests

        https_error: Exception | None = None
        try:
            reply = self._session.get(
                f"https://{self.host}/v2/", verify=self._verify, timeout=self.timeout, auth=NO_NETRC
            )
            self._count("GET")
            self._check_probe(reply)
            return f"https://{self.host}"
        except requests.exceptions.SSLError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate verify failed" in str(exc):
                raise RegistryError(
                    f"TLS certificate of {self.host} could not be verified; use --no-tls-verify for a registry "
                    "with a self-signed certificate, or point REQUESTS_CA_BUNDLE at its CA"
                ) from None
            https_error = exc  # the server does not speak TLS
        except requests.exceptions.ConnectionError as exc:
            https_error = exc
        if self._verify and not is_loopback(self.host):
            if isinstance(https_error, requests.exceptions.SSLError):
                raise RegistryError(
                    f"{self.host} does not speak HTTPS ({type(https_error).__name__}); use --no-tls-verify "
                    "to allow plain HTTP to this registry"
                )
            raise Retryable(f"cannot connect to https://{self.host}: {type(https_error).__name__}")
        try:
            reply = self._session.get(f"http://{self.host}/v2/", timeout=self.timeout, auth=NO_NETRC)
        except requests.exceptions.ConnectionError as exc:
            raise Retryable(f"cannot connect to {self.host}: {type(exc).__name__}") from None
        self._count("GET")
        self._check_probe(reply)
        log.info("registry %s speaks plain HTTP", self.host)
        return f"http://{self.host}"

    @staticmethod
    def _check_probe(reply: "requests.Response") -> None:
        if reply.status_code in RETRY_STATUSES:
            raise Retryable(f"GET /v2/ answered HTTP {reply.status_code}")
        if reply.status_code not in (200, 401):
            raise RegistryError(f"GET /v2/ answered HTTP {reply.status_code}: not a v2 registry")

    def _count(self, method: str) -> None:
        self.stats.requests += 1
        self.stats.by_method[method] = self.stats.by_method.get(method, 0) + 1

    def _with_retries(self, what: str, attempt: Callable[[], Any]) -> Any:
        """Run `attempt` until it succeeds, backing off on _Retryable; other errors pass through."""
        for number in range(self.retry.attempts):
            try:
                return attempt()
            except Retryable as exc:
                if number + 1 >= self.retry.attempts:
                    raise RegistryError(f"{what} failed after {self.retry.attempts} attempts: {exc}") from None
                delay = exc.retry_after if exc.retry_after is not None else self.retry.delay(number)
                self.stats.retries += 1
                log.warning("%s: %s; retrying in %.1fs (%d/%d)", what, exc, delay, number + 1, self.retry.attempts)
                time.sleep(min(delay, self.retry.max_backoff_s))
        raise AssertionError("unreachable")

    def _send(
        self, method: str, url: str, *, scope: str, headers: dict[str, str] | None = None,
        data: Any = None, stream: bool = False, rewind: Callable[[], None] | None = None,
    ) -> "requests.Response":
        """One request with auth (a 401 is answered once); 5xx and resets raise _Retryable."""
        import requests

        if not url.startswith("http"):
            url = self.base_url() + url
        for _ in range(3):
            merged = {**(headers or {}), **self._auth.header(scope)}
            if rewind is not None:
                rewind()
            try:
                reply = self._session.request(
                    method, url, headers=merged, data=data, stream=stream, verify=self._verify,
                    timeout=self.timeout, auth=NO_NETRC,
                )
            except requests.exceptions.SSLError as exc:
                raise RegistryError(f"TLS error talking to {self.host}: {type(exc).__name__}") from None
            except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.Timeout) as exc:
                raise Retryable(f"{method} {path_of(url)}: connection failed ({type(exc).__name__})") from None
            self._count(method)
            log.debug("%s %s -> %d", method, path_of(url), reply.status_code)
            if reply.status_code == 401:
                reply.close()
                self._auth.answer(reply, scope)
                continue
            self._auth.accepted(scope)
            if reply.status_code in RETRY_STATUSES:
                retry_after = reply.headers.get("Retry-After")
                reply.close()
                raise Retryable(
                    f"{method} {path_of(url)} answered HTTP {reply.status_code}",
                    float(retry_after) if retry_after and retry_after.isdigit() else None,
                )
            return reply
        raise AuthenticationError(f"authentication to {self.reference.registry} failed: HTTP 401")

    def _fail(self, what: str, reply: "requests.Response") -> RegistryError:
        if reply.status_code == 403:
            return AuthenticationError(f"{what}: access denied by {self.reference.registry} ({error_text(reply)})")
        return RegistryError(f"{what}: HTTP {reply.status_code} {error_text(reply)}")

    # -- reading ----------------------------------------------------------------

    def get_manifest(self, reference: str | None = None) -> tuple[bytes, str, str]:
        """Raw manifest (or index), its media type and verified digest."""
        ref = reference or self.reference.reference_in_repo
        url = "/" + self._container.manifest_url(ref).split("/", 1)[1]

        def attempt() -> tuple[bytes, str, str]:
            reply = self._send("GET", url, scope=self.pull_scope, headers={"Accept": ACCEPT}, stream=True)
            with reply:
                if reply.status_code == 404:
                    raise RegistryError(f"image {self.reference.repository}:{ref} not found on {self.reference.registry}")
                if reply.status_code != 200:
                    raise self._fail(f"GET manifest {ref}", reply)
                body = read_limited(reply, MAX_DOCUMENT_BYTES, f"manifest {ref}")
                media_type = reply.headers.get("Content-Type", "").split(";")[0].strip()
                header_digest = reply.headers.get("Docker-Content-Digest")
            digest = sha256_digest(body)
            if ref.startswith("sha256:") and digest != ref:
                raise RegistryError(f"manifest digest mismatch: asked for {ref}, got content hashing to {digest}")
            if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
                raise RegistryError(f"manifest digest mismatch: registry says {header_digest}, content is {digest}")
            if not media_type or media_type in ("application/json", "text/plain"):
                media_type = _media_type_from_body(body)
            return body, media_type, digest

        return self._with_retries(f"GET manifest {ref}", attempt)

    def has_blob(self, descriptor: Descriptor, scope: str | None = None) -> bool:
        url = "/" + self._container.get_blob_url(descriptor.digest).split("/", 1)[1]

        def attempt() -> bool:
            reply = self._send("HEAD", url, scope=scope or self.pull_scope)
            reply.close()
            if reply.status_code == 200:
                length = reply.headers.get("Content-Length")
                if length and length.isdigit() and int(length) != descriptor.size:
                    log.warning("registry has %s with size %s, expected %d", descriptor.digest, length, descriptor.size)
                    return False
                return True
            if reply.status_code == 404:
                return False
            raise self._fail(f"HEAD blob {descriptor.digest}", reply)

        return self._with_retries(f"HEAD blob {descriptor.digest}", attempt)

    def mount_blob(self, descriptor: Descriptor) -> bool:
        """Link a blob this process saw in another repository of the same registry (no bytes move).

        True when the registry mounted it; False (nothing changed) when it cannot.
        """
        sources = sorted(repo for reg, repo in _SEEN_BLOBS.get(descriptor.digest, ())
                         if reg == self.reference.registry and repo != self.reference.repository)
        post_url = "/" + self._container.upload_blob_url().split("/", 1)[1]
        for repo in sources[:3]:
            query = urlencode({"mount": descriptor.digest, "from": repo})
            scope = f"{self.push_scope} repository:{repo}:pull"
            try:
                reply = self._with_retries(
                    f"mount of {descriptor.digest}",
                    lambda: self._send("POST", f"{post_url}?{query}", scope=scope, headers={"Content-Length": "0"}),
                )
            except InfercacheError as exc:  # no pull right on the source repository, say
                log.debug("cannot mount %s from %s: %s", descriptor.digest, repo, exc)
                continue
            reply.close()
            if reply.status_code == 201:
                log.info("mounted blob %s from %s", descriptor.digest, repo)
                remember_blob(descriptor.digest, self.reference.registry or "", self.reference.repository or "")
                return True
            if reply.status_code == 202 and reply.headers.get("Location"):
                # The registry opened an ordinary upload instead: cancel it.
                try:
                    self._send("DELETE", self._location(reply), scope=self.push_scope).close()
                except InfercacheError:
                    pass
        return False

    def open_blob(self, descriptor: Descriptor) -> BinaryIO:
        """A buffered stream over the blob that resumes dropped downloads and verifies size and digest at its end."""
        remember_blob(descriptor.digest, self.reference.registry or "", self.reference.repository or "")
        return verified_download(descriptor, lambda offset: self._blob_response(descriptor, offset), self.retry,
                                 self.stats)

    def _blob_response(self, descriptor: Descriptor, offset: int) -> "requests.Response":
        url = "/" + self._container.get_blob_url(descriptor.digest).split("/", 1)[1]
        headers = {"Range": f"bytes={offset}-"} if offset else {}

        def attempt() -> "requests.Response":
            reply = self._send("GET", url, scope=self.pull_scope, headers=headers, stream=True)
            if reply.status_code == 404:
                reply.close()
                raise RegistryError(f"blob {descriptor.digest} not found in {self.reference.repository}")
            if reply.status_code not in (200, 206):
                with reply:
                    raise self._fail(f"GET blob {descriptor.digest}", reply)
            return reply

        return self._with_retries(f"GET blob {descriptor.digest}", attempt)

    def list_tags(self) -> list[str]:
        url = "/" + self._container.tags_url().split("/", 1)[1]

        def attempt() -> list[str]:
            reply = self._send("GET", url, scope=self.pull_scope)
            with reply:
                if reply.status_code == 404:
                    return []
                if reply.status_code != 200:
                    raise self._fail("GET tags", reply)
                try:
                    return list(json.loads(read_limited(reply, MAX_DOCUMENT_BYTES, "tag list")).get("tags") or [])
                except (ValueError, AttributeError):
                    raise RegistryError("registry returned a tag list that is not JSON") from None

        return self._with_retries("GET tags", attempt)

    # -- writing ----------------------------------------------------------------

    def put_blob(self, descriptor: Descriptor, stream: BinaryIO) -> None:
        """Upload exactly descriptor.size bytes, verified locally first, retried as a whole."""
        with verified_seekable(stream, descriptor) as (handle, start):
            def attempt() -> None:
                self._upload(descriptor, handle, start)

            self._with_retries(f"upload of blob {descriptor.digest}", attempt)
        remember_blob(descriptor.digest, self.reference.registry or "", self.reference.repository or "")
        self.stats.blobs_uploaded += 1
        self.stats.bytes_uploaded += descriptor.size
        log.info("uploaded blob %s (%d bytes)", descriptor.digest, descriptor.size)

    def _upload(self, descriptor: Descriptor, handle: BinaryIO, start: int) -> None:
        post_url = "/" + self._container.upload_blob_url().split("/", 1)[1]
        reply = self._send("POST", post_url, scope=self.push_scope, headers={"Content-Length": "0"})
        reply.close()
        if reply.status_code != 202:
            raise self._fail(f"starting upload of {descriptor.digest}", reply)
        location = self._location(reply)
        if descriptor.size > self.chunk_size:
            offset = 0
            while offset < descriptor.size:
                length = min(self.chunk_size, descriptor.size - offset)
                part = FileSlice(handle, start + offset, length)
                reply = self._send(
                    "PATCH", location, scope=self.push_scope, data=part, rewind=part.rewind,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + length - 1}",
                        "Content-Length": str(length),
                    },
                )
                reply.close()
                if reply.status_code != 202:
                    raise self._fail(f"uploading chunk of {descriptor.digest}", reply)
                location = self._location(reply)
                offset += length
            body: Any = b""
            headers = {"Content-Length": "0"}
        else:
            body = FileSlice(handle, start, descriptor.size)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(descriptor.size)}
        sep = "&" if "?" in location else "?"
        put_url = f"{location}{sep}{urlencode({'digest': descriptor.digest})}"
        reply = self._send(
            "PUT", put_url, scope=self.push_scope, data=body, headers=headers,
            rewind=body.rewind if isinstance(body, FileSlice) else None,
        )
        reply.close()
        if reply.status_code not in (201, 204):
            raise self._fail(f"finishing upload of {descriptor.digest}", reply)

    def _location(self, reply: "requests.Response") -> str:
        location = reply.headers.get("Location")
        if not location:
            raise RegistryError("registry did not say where to upload (no Location header)")
        return urljoin(self.base_url() + "/", location)

    def put_manifest(self, manifest: bytes, media_type: str, reference: str | None = None) -> str:
        """PUT the manifest under the tag (or digest); returns its digest, checked against the registry's."""
        digest = sha256_digest(manifest)
        ref = reference or self.reference.tag or self.reference.digest or "latest"
        if ref.startswith("sha256:") and ref != digest:
            raise BadInputError(f"cannot push to {ref}: the manifest's digest is {digest}")
        url = "/" + self._container.manifest_url(ref).split("/", 1)[1]

        def attempt() -> str:
            reply = self._send(
                "PUT", url, scope=self.push_scope, data=manifest, headers={"Content-Type": media_type}
            )
            reply.close()
            if reply.status_code not in (200, 201, 202):
                raise self._fail(f"PUT manifest {ref}", reply)
            remote = reply.headers.get("Docker-Content-Digest")
            if remote and remote != digest:
                raise RegistryError(f"registry stored manifest as {remote}, expected {digest}")
            return digest

        result = self._with_retries(f"PUT manifest {ref}", attempt)
        log.info("pushed %s/%s:%s (%s)", self.reference.registry, self.reference.repository, ref, digest)
        return result

    def close(self) -> None:
        self._session.close()


def _media_type_from_body(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        raise RegistryError("registry returned a manifest that is not JSON") from None
    if isinstance(data, dict) and data.get("mediaType"):
        return str(data["mediaType"])
    return OCI_INDEX if isinstance(data, dict) and "manifests" in data else OCI_MANIFEST



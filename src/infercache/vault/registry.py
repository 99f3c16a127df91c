"""The ``docker://`` transport: a Distribution-spec v2 registry client.

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

import hashlib
import io
import json
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator

from infercache.errors import BadInputError, InfercacheError
from infercache.vault.auth import _NO_NETRC, AuthenticationError, RegistryAuth
from infercache.vault.transport import Descriptor, ImageReference, RegistryOptions

if TYPE_CHECKING:  # pragma: no cover
    import requests

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST))

MAX_MANIFEST_BYTES = 4 << 20  # the limit registries themselves apply
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_READ_BLOCK = 1 << 20
_SPOOL_IN_MEMORY = 8 << 20
_LOOPBACK_HOSTS = ("localhost", "127.", "[::1]")
# docker.io names the registry's UI; the API lives elsewhere.
_API_HOSTS = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}


@dataclass(frozen=True)
class RetryPolicy:
    """Retries with exponential backoff (and jitter) on 5xx/429 and dropped connections."""

    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0

    def delay(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        return base * (0.75 + random.random() / 2)  # noqa: S311 - jitter, not crypto


@dataclass
class RegistryStats:
    """What a client did: tests and benchmarks read it (no secrets in here)."""

    requests: int = 0
    retries: int = 0
    blobs_uploaded: int = 0
    blobs_present: int = 0
    blobs_mounted: int = 0
    bytes_uploaded: int = 0
    bytes_downloaded: int = 0
    by_method: dict[str, int] = field(default_factory=dict)


# Where this process has seen each blob: (registry, repository) by digest. Lets a push to
# another repository of the same registry mount the blob instead of uploading it again
# (what skopeo's blob-info cache does, kept in memory only).
_SEEN_BLOBS: dict[str, set[tuple[str, str]]] = {}


def _remember(digest: str, registry: str, repository: str) -> None:
    _SEEN_BLOBS.setdefault(digest, set()).add((registry, repository))


class RegistryError(InfercacheError):
    """The registry answered with an error we cannot recover from (exit 1)."""


class _Retryable(Exception):
    """Internal: a failure worth another attempt (5xx, reset connection)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _is_loopback(host: str) -> bool:
    return host.startswith(_LOOPBACK_HOSTS)


def _error_text(response: "requests.Response") -> str:
    """The registry's own error codes/messages (distribution error JSON), short."""
    try:
        errors = response.json().get("errors") or []
        parts = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors if isinstance(e, dict)]
        if parts:
            return "; ".join(parts)[:300]
    except Exception:  # noqa: BLE001 - an unreadable error body must not hide the status
        pass
    return (response.reason or "").strip()


class _RedactQueries(logging.Filter):
    """Hides URL query strings in urllib3's debug lines: upload state and pre-signed
    blob redirects (S3/GCS signatures) carry secrets there."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, str) and "?" in a for a in record.args):
            record.args = tuple(
                a.split("?", 1)[0] + "?<redacted>" if isinstance(a, str) and "?" in a else a for a in record.args
            )
        return True


def _install_redaction() -> None:
    target = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _RedactQueries) for f in target.filters):
        target.addFilter(_RedactQueries())


def _path_of(url: str) -> str:
    """The URL's path only: upload locations carry opaque state in the query."""
    from urllib.parse import urlsplit

    return urlsplit(url).path


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
        self.host = _API_HOSTS.get(reference.registry, reference.registry)
        self._container = Container(f"{self.host}/{reference.repository}")
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"infercache/{_version()}"
        self._verify: bool = self.options.tls_verify
        self._auth = RegistryAuth(
            self._session, reference.registry, reference.repository, self.options.creds, self.options.authfile,
            verify=self._verify,
        )
        self._base: str | None = None
        _install_redaction()
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
                f"https://{self.host}/v2/", verify=self._verify, timeout=self.timeout, auth=_NO_NETRC
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
        if self._verify and not _is_loopback(self.host):
            if isinstance(https_error, requests.exceptions.SSLError):
                raise RegistryError(
                    f"{self.host} does not speak HTTPS ({type(https_error).__name__}); use --no-tls-verify "
                    "to allow plain HTTP to this registry"
                )
            raise _Retryable(f"cannot connect to https://{self.host}: {type(https_error).__name__}")
        try:
            reply = self._session.get(f"http://{self.host}/v2/", timeout=self.timeout, auth=_NO_NETRC)
        except requests.exceptions.ConnectionError as exc:
            raise _Retryable(f"cannot connect to {self.host}: {type(exc).__name__}") from None
        self._count("GET")
        self._check_probe(reply)
        log.info("registry %s speaks plain HTTP", self.host)
        return f"http://{self.host}"

    @staticmethod
    def _check_probe(reply: "requests.Response") -> None:
        if reply.status_code in RETRY_STATUSES:
            raise _Retryable(f"GET /v2/ answered HTTP {reply.status_code}")
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
            except _Retryable as exc:
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
                    timeout=self.timeout, auth=_NO_NETRC,
                )
            except requests.exceptions.SSLError as exc:
                raise RegistryError(f"TLS error talking to {self.host}: {type(exc).__name__}") from None
            except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.Timeout) as exc:
                raise _Retryable(f"{method} {_path_of(url)}: connection failed ({type(exc).__name__})") from None
            self._count(method)
            log.debug("%s %s -> %d", method, _path_of(url), reply.status_code)
            if reply.status_code == 401:
                reply.close()
                self._auth.answer(reply, scope)
                continue
            self._auth.accepted(scope)
            if reply.status_code in RETRY_STATUSES:
                retry_after = reply.headers.get("Retry-After")
                reply.close()
                raise _Retryable(
                    f"{method} {_path_of(url)} answered HTTP {reply.status_code}",
                    float(retry_after) if retry_after and retry_after.isdigit() else None,
                )
            return reply
        raise AuthenticationError(f"authentication to {self.reference.registry} failed: HTTP 401")

    def _fail(self, what: str, reply: "requests.Response") -> RegistryError:
        if reply.status_code == 403:
            return AuthenticationError(f"{what}: access denied by {self.reference.registry} ({_error_text(reply)})")
        return RegistryError(f"{what}: HTTP {reply.status_code} {_error_text(reply)}")

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
                body = _read_limited(reply, MAX_MANIFEST_BYTES, f"manifest {ref}")
                media_type = reply.headers.get("Content-Type", "").split(";")[0].strip()
                header_digest = reply.headers.get("Docker-Content-Digest")
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
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
        from urllib.parse import urlencode

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
                _remember(descriptor.digest, self.reference.registry or "", self.reference.repository or "")
                return True
            if reply.status_code == 202 and reply.headers.get("Location"):
                # The registry opened an ordinary upload instead: cancel it.
                try:
                    self._send("DELETE", self._location(reply), scope=self.push_scope).close()
                except InfercacheError:
                    pass
        return False

    def open_blob(self, descriptor: Descriptor) -> BinaryIO:
        """A buffered stream over the blob that verifies size and digest when it ends."""
        _remember(descriptor.digest, self.reference.registry or "", self.reference.repository or "")
        return io.BufferedReader(_BlobReader(self, descriptor), buffer_size=_READ_BLOCK)  # type: ignore[return-value]

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
                    return list(json.loads(_read_limited(reply, MAX_MANIFEST_BYTES, "tag list")).get("tags") or [])
                except (ValueError, AttributeError):
                    raise RegistryError("registry returned a tag list that is not JSON") from None

        return self._with_retries("GET tags", attempt)

    # -- writing ----------------------------------------------------------------

    def put_blob(self, descriptor: Descriptor, stream: BinaryIO) -> None:
        """Upload exactly descriptor.size bytes, verified locally first, retried as a whole."""
        with _verified_seekable(stream, descriptor) as (handle, start):
            def attempt() -> None:
                self._upload(descriptor, handle, start)

            self._with_retries(f"upload of blob {descriptor.digest}", attempt)
        _remember(descriptor.digest, self.reference.registry or "", self.reference.repository or "")
        self.stats.blobs_uploaded += 1
        self.stats.bytes_uploaded += descriptor.size
        log.info("uploaded blob %s (%d bytes)", descriptor.digest, descriptor.size)

    def _upload(self, descriptor: Descriptor, handle: BinaryIO, start: int) -> None:
        from urllib.parse import urlencode

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
                part = _FileSlice(handle, start + offset, length)
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
            body = _FileSlice(handle, start, descriptor.size)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(descriptor.size)}
        sep = "&" if "?" in location else "?"
        put_url = f"{location}{sep}{urlencode({'digest': descriptor.digest})}"
        reply = self._send(
            "PUT", put_url, scope=self.push_scope, data=body, headers=headers,
            rewind=body.rewind if isinstance(body, _FileSlice) else None,
        )
        reply.close()
        if reply.status_code not in (201, 204):
            raise self._fail(f"finishing upload of {descriptor.digest}", reply)

    def _location(self, reply: "requests.Response") -> str:
        from urllib.parse import urljoin

        location = reply.headers.get("Location")
        if not location:
            raise RegistryError("registry did not say where to upload (no Location header)")
        return urljoin(self.base_url() + "/", location)

    def put_manifest(self, manifest: bytes, media_type: str, reference: str | None = None) -> str:
        """PUT the manifest under the tag (or digest); returns its digest, checked against the registry's."""
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
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


def _version() -> str:
    from infercache import __version__

    return __version__


def _read_limited(reply: "requests.Response", limit: int, what: str) -> bytes:
    """The whole (small) body, capped; a connection dropped mid-body is worth a retry."""
    import requests

    chunks: list[bytes] = []
    total = 0
    try:
        for chunk in reply.iter_content(64 << 10):
            total += len(chunk)
            if total > limit:
                raise RegistryError(f"{what} is larger than {limit} bytes; refusing it")
            chunks.append(chunk)
    except requests.exceptions.RequestException as exc:
        raise _Retryable(f"reading {what} failed ({type(exc).__name__})") from None
    return b"".join(chunks)


def _media_type_from_body(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        raise RegistryError("registry returned a manifest that is not JSON") from None
    if isinstance(data, dict) and data.get("mediaType"):
        return str(data["mediaType"])
    return OCI_INDEX if isinstance(data, dict) and "manifests" in data else OCI_MANIFEST


class _FileSlice:
    """`length` bytes of a seekable file from `start`, re-readable for retries.

    No ``fileno``: requests would otherwise take the whole file's size as Content-Length.
    """

    def __init__(self, handle: BinaryIO, start: int, length: int) -> None:
        self._handle, self._start, self._length, self._left = handle, start, length, length

    def __len__(self) -> int:
        return self._left

    def rewind(self) -> None:
        self._handle.seek(self._start)
        self._left = self._length

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if size is None or size < 0 else min(size, self._left)
        data = self._handle.read(max(want, 0))
        self._left -= len(data)
        return data

    def __iter__(self) -> Iterator[bytes]:
        self.rewind()
        while True:
            data = self.read(_READ_BLOCK)
            if not data:
                return
            yield data


class _verified_seekable:  # noqa: N801 - used as a context manager function
    """Hash exactly descriptor.size bytes of `stream` before any upload starts.

    A seekable file is hashed in place and rewound; anything else is spooled
    (memory up to 8 MiB, then a temp file): never the whole layer in memory.
    A digest or size mismatch raises before the registry sees a byte.
    """

    def __init__(self, stream: BinaryIO, descriptor: Descriptor) -> None:
        self._stream, self._descriptor = stream, descriptor
        self._spool: Any = None

    def __enter__(self) -> tuple[BinaryIO, int]:
        stream, desc = self._stream, self._descriptor
        start: int | None = None
        try:
            if stream.seekable():
                start = stream.tell()
        except (OSError, AttributeError, ValueError):
            start = None
        target: Any = None
        if start is None:
            self._spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY, prefix="infercache-blob-")
            target = self._spool
        hasher = hashlib.sha256()
        left = desc.size
        while left > 0:
            chunk = stream.read(min(_READ_BLOCK, left))
            if not chunk:
                break
            hasher.update(chunk)
            left -= len(chunk)
            if target is not None:
                target.write(chunk)
        if left:
            self._close()
            raise InfercacheError(f"blob {desc.digest} is truncated: {desc.size - left} of {desc.size} bytes")
        digest = "sha256:" + hasher.hexdigest()
        if digest != desc.digest:
            self._close()
            raise InfercacheError(f"blob digest mismatch: expected {desc.digest}, content hashes to {digest}")
        if target is not None:
            target.seek(0)
            return target, 0
        stream.seek(start)  # type: ignore[arg-type]
        return stream, start  # type: ignore[return-value]

    def _close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def __exit__(self, *exc: object) -> None:
        self._close()


class _BlobReader(io.RawIOBase):
    """Streams a blob; on a dropped connection resumes with a Range request; verifies at the end."""

    def __init__(self, client: RegistryClient, descriptor: Descriptor) -> None:
        super().__init__()
        self._client, self._desc = client, descriptor
        self._hasher = hashlib.sha256()
        self._pos = 0
        self._resumes = 0
        self._reply: Any = client._blob_response(descriptor, 0)
        self._verified = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        import requests
        import urllib3

        view = memoryview(buffer).cast("B")
        while True:
            try:
                data = self._reply.raw.read(len(view), decode_content=False)
                break
            except (urllib3.exceptions.HTTPError, requests.exceptions.RequestException, ConnectionError) as exc:
                self._resume(exc)
        if not data:
            self._finish()
            return 0
        if self._pos + len(data) > self._desc.size:
            raise InfercacheError(f"blob {self._desc.digest} is longer than its descriptor's {self._desc.size} bytes")
        self._hasher.update(data)
        self._pos += len(data)
        self._client.stats.bytes_downloaded += len(data)
        view[: len(data)] = data
        return len(data)

    def _resume(self, exc: BaseException) -> None:
        self._resumes += 1
        if self._resumes >= self._client.retry.attempts:
            raise RegistryError(f"download of {self._desc.digest} kept failing: {type(exc).__name__}") from None
        log.warning("download of %s interrupted at byte %d (%s); resuming", self._desc.digest, self._pos,
                    type(exc).__name__)
        self._client.stats.retries += 1
        self._reply.close()
        time.sleep(self._client.retry.delay(self._resumes - 1))
        reply = self._client._blob_response(self._desc, self._pos)
        if reply.status_code == 200 and self._pos:
            # The server ignored Range: skip what we already have.
            skip = self._pos
            while skip:
                got = reply.raw.read(min(skip, _READ_BLOCK), decode_content=False)
                if not got:
                    break
                skip -= len(got)
        self._reply = reply

    def _finish(self) -> None:
        if self._verified:
            return
        if self._pos != self._desc.size:
            raise InfercacheError(f"blob {self._desc.digest} is truncated: {self._pos} of {self._desc.size} bytes")
        digest = "sha256:" + self._hasher.hexdigest()
        if digest != self._desc.digest:
            raise InfercacheError(f"blob digest mismatch: expected {self._desc.digest}, content hashes to {digest}")
        self._verified = True

    def close(self) -> None:
        if not self.closed:
            self._reply.close()
        super().close()


def _choose_from_index(index: bytes, tag: str | None) -> Descriptor:
    """The image manifest an index points at: the one tagged `tag`, else the first real image.

    Attestation manifests (buildkit's ``unknown/unknown`` platform) are skipped.
    """
    try:
        data = json.loads(index)
        entries = [e for e in data.get("manifests", []) if isinstance(e, dict)]
    except (ValueError, AttributeError):
        raise RegistryError("image index is not valid JSON") from None
    images = [e for e in entries if e.get("mediaType") in IMAGE_MANIFEST_TYPES]
    if tag:
        for entry in images:
            if (entry.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag:
                return Descriptor.from_json(entry)
    for entry in images:
        platform = entry.get("platform") or {}
        attest = (entry.get("annotations") or {}).get("vnd.docker.reference.type") == "attestation-manifest"
        if not attest and platform.get("os") != "unknown":
            return Descriptor.from_json(entry)
    if images:
        return Descriptor.from_json(images[0])
    raise RegistryError("image index holds no image manifest")


class RegistrySource:
    """Reads one image from a registry (``docker://``)."""

    def __init__(self, reference: ImageReference, options: RegistryOptions | None = None, **client_kw: Any) -> None:
        self.reference = reference
        self.client = RegistryClient(reference, options, **client_kw)
        self.digest: str | None = None  # of the image manifest, once read

    def get_manifest(self) -> tuple[bytes, str]:
        body, media_type, digest = self.client.get_manifest()
        for _ in range(2):  # an index of indexes is resolved one more level at most
            if media_type not in INDEX_TYPES:
                break
            chosen = _choose_from_index(body, self.reference.tag)
            body, media_type, digest = self.client.get_manifest(chosen.digest)
            if len(body) != chosen.size:
                raise RegistryError(f"manifest {chosen.digest} is {len(body)} bytes, index says {chosen.size}")
        if media_type not in IMAGE_MANIFEST_TYPES:
            raise RegistryError(f"unsupported manifest type {media_type!r} for {self.reference}")
        self.digest = digest
        self._remember_blobs(body)
        return body, media_type

    def _remember_blobs(self, manifest: bytes) -> None:
        """The registry only accepts a manifest whose blobs the repository holds: note them for mounts."""
        try:
            data = json.loads(manifest)
            items = [data.get("config") or {}, *(data.get("layers") or [])]
        except (ValueError, AttributeError, TypeError):
            return
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("digest"), str):
                _remember(item["digest"], self.reference.registry or "", self.reference.repository or "")

    def open_blob(self, descriptor: Descriptor) -> BinaryIO:
        return self.client.open_blob(descriptor)

    def close(self) -> None:
        self.client.close()


class RegistryDestination:
    """Pushes one image to a registry: blobs first, the manifest (the commit point) last.

    Blobs pushed before a failure stay unreferenced in the registry, which its
    garbage collector removes; no tag ever points at a partial image.
    """

    def __init__(self, reference: ImageReference, options: RegistryOptions | None = None, **client_kw: Any) -> None:
        self.reference = reference
        self.client = RegistryClient(reference, options, **client_kw)
        self.digest: str | None = None

    def has_blob(self, descriptor: Descriptor) -> bool:
        """True when the repository has the blob, or it could be mounted from a sibling repository."""
        present = self.client.has_blob(descriptor, scope=self.client.push_scope)
        if present:
            self.client.stats.blobs_present += 1
            log.info("blob %s already in %s, skipping", descriptor.digest, self.reference.repository)
            return True
        if self.client.mount_blob(descriptor):
            self.client.stats.blobs_mounted += 1
            return True
        return False

    def put_blob(self, descriptor: Descriptor, stream: BinaryIO) -> None:
        self.client.put_blob(descriptor, stream)

    def put_manifest(self, manifest: bytes, media_type: str) -> str:
        self.digest = self.client.put_manifest(manifest, media_type)
        return self.digest

    def close(self) -> None:
        self.client.close()


def env_retry_policy() -> RetryPolicy:
    """`INFERCACHE_REGISTRY_RETRIES` / `INFERCACHE_REGISTRY_BACKOFF` override the defaults."""
    try:
        attempts = int(os.environ.get("INFERCACHE_REGISTRY_RETRIES", "5"))
        backoff = float(os.environ.get("INFERCACHE_REGISTRY_BACKOFF", "0.5"))
    except ValueError:
        raise BadInputError("INFERCACHE_REGISTRY_RETRIES/BACKOFF must be numbers") from None
    return RetryPolicy(attempts=max(1, attempts), backoff_s=max(0.0, backoff))

"""HTTP plumbing for the registry client: retry policy, errors, counters, log redaction,
capped bodies, re-readable upload slices, hashing before upload, and downloads that resume.

Nothing here knows the Distribution API's URLs or auth flow (that is `registry_client`).
"""

from __future__ import annotations

import io
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator
from urllib.parse import urlsplit

from infercache.errors import BadInputError, InfercacheError
from infercache.vault.image import VerifyingReader
from infercache.vault.reference import Descriptor

if TYPE_CHECKING:  # pragma: no cover
    import requests

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
READ_BLOCK = 1 << 20
_SPOOL_IN_MEMORY = 8 << 20


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


def env_retry_policy() -> RetryPolicy:
    """`INFERCACHE_REGISTRY_RETRIES` / `INFERCACHE_REGISTRY_BACKOFF` override the defaults."""
    try:
        attempts = int(os.environ.get("INFERCACHE_REGISTRY_RETRIES", "5"))
        backoff = float(os.environ.get("INFERCACHE_REGISTRY_BACKOFF", "0.5"))
    except ValueError:
        raise BadInputError("INFERCACHE_REGISTRY_RETRIES/BACKOFF must be numbers") from None
    return RetryPolicy(attempts=max(1, attempts), backoff_s=max(0.0, backoff))


class RegistryError(InfercacheError):
    """The registry answered with an error we cannot recover from (exit 1)."""


class Retryable(Exception):
    """Internal: a failure worth another attempt (5xx, reset connection)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def error_text(response: "requests.Response") -> str:
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


def install_redaction() -> None:
    target = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _RedactQueries) for f in target.filters):
        target.addFilter(_RedactQueries())


def path_of(url: str) -> str:
    """The URL's path only: upload locations carry opaque state in the query."""
    return urlsplit(url).path


def read_limited(reply: "requests.Response", limit: int, what: str) -> bytes:
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
        raise Retryable(f"reading {what} failed ({type(exc).__name__})") from None
    return b"".join(chunks)


class FileSlice:
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
            data = self.read(READ_BLOCK)
            if not data:
                return
            yield data


class verified_seekable:  # noqa: N801 - used as a context manager function
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
        reader = VerifyingReader(stream, desc, owns_stream=False)  # the one size-and-digest check
        try:
            while chunk := reader.read(READ_BLOCK):
                if target is not None:
                    target.write(chunk)
            reader.verify_to_end()
        except BaseException:
            self._close()
            raise
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


class ResumingStream(io.RawIOBase):
    """A blob download that resumes with a Range request when the connection drops.

    It hands back raw bytes only: the caller wraps it in a VerifyingReader, the one
    place size and digest are checked.
    """

    def __init__(
        self, descriptor: Descriptor, fetch: Callable[[int], "requests.Response"], retry: RetryPolicy,
        stats: RegistryStats,
    ) -> None:
        super().__init__()
        self._desc, self._fetch, self._retry, self._stats = descriptor, fetch, retry, stats
        self._pos = 0
        self._resumes = 0
        self._reply: Any = fetch(0)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes as the connection hands them over (no extra copy on the way)."""
        import requests
        import urllib3

        if size is None or size < 0:
            return self.readall()
        while True:
            try:
                data = self._reply.raw.read(size, decode_content=False)
                break
            except (urllib3.exceptions.HTTPError, requests.exceptions.RequestException, ConnectionError) as exc:
                self._resume(exc)
        self._pos += len(data)
        self._stats.bytes_downloaded += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def _resume(self, exc: BaseException) -> None:
        self._resumes += 1
        if self._resumes >= self._retry.attempts:
            raise RegistryError(f"download of {self._desc.digest} kept failing: {type(exc).__name__}") from None
        log.warning("download of %s interrupted at byte %d (%s); resuming", self._desc.digest, self._pos,
                    type(exc).__name__)
        self._stats.retries += 1
        self._reply.close()
        time.sleep(self._retry.delay(self._resumes - 1))
        reply = self._fetch(self._pos)
        if reply.status_code == 200 and self._pos:
            # The server ignored Range: skip what we already have.
            skip = self._pos
            while skip:
                got = reply.raw.read(min(skip, READ_BLOCK), decode_content=False)
                if not got:
                    break
                skip -= len(got)
        self._reply = reply

    def close(self) -> None:
        if not self.closed:
            self._reply.close()
        super().close()


def verified_download(
    descriptor: Descriptor, fetch: Callable[[int], "requests.Response"], retry: RetryPolicy, stats: RegistryStats
) -> BinaryIO:
    """A buffered, resuming stream over a blob that fails on a wrong size or digest at its end."""
    raw = ResumingStream(descriptor, fetch, retry, stats)
    return io.BufferedReader(VerifyingReader(raw, descriptor), buffer_size=READ_BLOCK)  # type: ignore[arg-type, return-value]

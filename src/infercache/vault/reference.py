"""The vocabulary every transport shares: references, descriptors, options and the two interfaces.

The leaf of `infercache.vault`: it imports nothing else from the package, and every
transport module (`layout`, `oci_archive`, `docker_archive`, `registry`) imports it.
`transport.py` maps a transport name to its classes.

skopeo-style references (`oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`,
`docker-archive:FILE[:NAME:TAG]`, `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`)
name where an image is read from or written to. Pack, copy, inspect and unpack
only talk to :class:`ImageSource` / :class:`ImageDestination`.

Contract for implementers:
- Blobs are streamed, never held whole in memory.
- ``ImageSource.get_manifest()`` returns ONE image manifest (an index is
  resolved to its first image manifest, or the one matching the tag) as raw
  bytes plus its media type; callers verify digests of every blob they read.
- ``ImageDestination.put_blob()`` receives exactly ``descriptor.size`` bytes
  and must verify the digest before making the blob visible (temp + rename).
- ``ImageDestination.put_manifest()`` is the commit point; ``close()`` after
  a failure must leave no partial image behind.
- Optional, for destinations on local disk: ``spool_dir() -> Path`` and
  ``adopt_blob(descriptor, path)`` let pack build a layer where the destination
  keeps blobs and hand it over by rename (one write instead of two); callers
  check for them with ``getattr`` and fall back to ``put_blob``.
- Every class takes ``(reference, options)``; local transports ignore the options.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

from infercache.errors import BadInputError

Transport = Literal["oci", "oci-archive", "docker-archive", "docker"]
TRANSPORTS: tuple[str, ...] = ("oci", "oci-archive", "docker-archive", "docker")
DEFAULT_TAG = "latest"

#: Docker Hub: what a bare image name means, the spellings auth files and `docker save`
#: tags use for it, and where its API really lives.
DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES: tuple[str, ...] = ("docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")
DOCKER_HUB_API = "registry-1.docker.io"
_PREFIXES = ("docker://", "oci:", "oci-archive:", "docker-archive:")

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None = None

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            data["annotations"] = dict(self.annotations)
        return data

    @classmethod
    def from_json(cls, data: dict[str, object]) -> "Descriptor":
        try:
            digest = str(data["digest"])
            size = int(data["size"])  # type: ignore[arg-type]
            media_type = str(data.get("mediaType", ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInputError(f"malformed descriptor {data!r}: {exc}") from None
        if not _DIGEST_RE.match(digest):
            raise BadInputError(f"unsupported or malformed digest {digest!r} (only sha256 is accepted)")
        if size < 0:
            raise BadInputError(f"negative blob size in descriptor {digest}")
        annotations = data.get("annotations")
        return cls(media_type, digest, size, dict(annotations) if isinstance(annotations, dict) else None)


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach a registry: TLS verification and credentials (never logged)."""

    tls_verify: bool = True
    authfile: Path | None = None
    creds: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ImageReference:
    """A parsed skopeo-style image reference."""

    transport: Transport
    path: str | None = None  # oci / oci-archive / docker-archive: the directory or file
    tag: str | None = None  # oci*: ref name in index.json; docker-archive: "name:tag"; docker: tag
    registry: str | None = None  # docker: host[:port]
    repository: str | None = None  # docker: repo path
    digest: str | None = None  # docker: @sha256:...

    @classmethod
    def parse(cls, text: str) -> "ImageReference":
        """Parse `text`; a reference without a known transport prefix is a BadInputError."""
        if text.startswith("docker://"):
            return cls._parse_docker(text[len("docker://") :], text)
        transport, sep, rest = text.partition(":")
        if not sep or transport not in ("oci", "oci-archive", "docker-archive") or not rest:
            raise BadInputError(
                f"bad image reference {text!r}: expected oci:DIR[:TAG], oci-archive:FILE[:TAG], "
                "docker-archive:FILE[:NAME:TAG] or docker://HOST/REPO[:TAG]"
            )
        if transport == "docker-archive":
            path, _, name = rest.partition(":")
            return cls("docker-archive", path=path, tag=name or None)
        path, _, tag = rest.partition(":")
        return cls(transport, path=path, tag=tag or None)  # type: ignore[arg-type]

    @classmethod
    def _parse_docker(cls, rest: str, text: str) -> "ImageReference":
        name, at, digest = rest.partition("@")
        if at and not _DIGEST_RE.match(digest):
            raise BadInputError(f"bad digest in {text!r}")
        host, slash, repo = name.partition("/")
        if not slash or not repo or not host:
            raise BadInputError(f"bad registry reference {text!r}: expected docker://HOST[:PORT]/REPO[:TAG]")
        tag = None
        if ":" in repo.rsplit("/", 1)[-1]:
            repo, _, tag = repo.rpartition(":")
        if not re.match(r"^[a-z0-9]+(?:[._/-][a-z0-9]+)*$", repo):
            raise BadInputError(f"bad repository name {repo!r} in {text!r} (lower-case letters, digits, . _ - /)")
        return cls("docker", registry=host, repository=repo, tag=tag, digest=digest or None)

    @classmethod
    def from_image_name(cls, text: str) -> "ImageReference":
        """A transport reference as is, or a bare image name read with docker's naming rules.

        `quay.io/x/y:tag` → `docker://quay.io/x/y:tag`; `x/y` → `docker://docker.io/x/y`;
        `y` → `docker://docker.io/library/y` (what `docker pull` and MCV's `-i` accept).
        """
        name = text.strip()
        if not name:
            raise BadInputError("an image name must not be empty")
        if name.startswith(_PREFIXES):
            return cls.parse(name)
        first, slash, _rest = name.partition("/")
        if not slash:
            return cls.parse(f"docker://{DOCKER_HUB}/library/{name}")
        if "." in first or ":" in first or first == "localhost":
            return cls.parse(f"docker://{name}")
        return cls.parse(f"docker://{DOCKER_HUB}/{name}")

    def local_path(self) -> Path:
        """The file or directory a local reference (oci, oci-archive, docker-archive) names."""
        if self.transport == "docker" or not self.path:
            raise BadInputError(f"{self} names no local file or directory")
        return Path(self.path).expanduser()

    @property
    def reference_in_repo(self) -> str:
        """For a registry: the tag or digest to ask for."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        if self.transport == "docker":
            suffix = f"@{self.digest}" if self.digest else f":{self.tag or DEFAULT_TAG}"
            return f"docker://{self.registry}/{self.repository}{suffix}"
        return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")


class ImageSource(Protocol):
    """Reads one image."""

    reference: ImageReference

    def get_manifest(self) -> tuple[bytes, str]:
        """Raw manifest bytes and media type of the referenced image manifest."""
        ...

    def open_blob(self, descriptor: Descriptor) -> BinaryIO:
        """A stream of the blob's bytes (the caller verifies the digest as it reads)."""
        ...

    def close(self) -> None: ...


class ImageDestination(Protocol):
    """Writes one image; nothing is visible until put_manifest()."""

    reference: ImageReference

    def has_blob(self, descriptor: Descriptor) -> bool:
        """True when the destination already holds this blob (it will be skipped)."""
        ...

    def put_blob(self, descriptor: Descriptor, stream: BinaryIO) -> None:
        """Store exactly descriptor.size bytes from `stream`, verifying the digest."""
        ...

    def put_manifest(self, manifest: bytes, media_type: str) -> str:
        """Store the manifest, tag it, and return its digest."""
        ...

    def close(self) -> None:
        """Finish (write archives) after success, or discard partial state after a failure."""
        ...




def familiar_name(name: str) -> str:
    """`docker.io/library/x:t` → `x:t`: the short form of a Docker Hub name (skopeo writes the long one)."""
    for host in DOCKER_HUB_ALIASES:
        if name.startswith(host + "/"):
            name = name[len(host) + 1 :]
            break
    return name[len("library/") :] if name.startswith("library/") else name


def as_reference(reference: "ImageReference | str") -> "ImageReference":
    """A parsed reference from either form callers hand in."""
    return ImageReference.parse(reference) if isinstance(reference, str) else reference

"""Checks of manifest.json against what extraction staged, shared by every component's unpack.

A leaf module (no project imports): `unpack` (Triton, vLLM) and `inductor` each raise their own
error type, passed in as `error`, so the messages and exception classes stay theirs.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol


class StagedFile(Protocol):
    """What extraction recorded for one regular file (file_writer.ExtractedFile has these)."""

    @property
    def size(self) -> int: ...

    @property
    def sha256(self) -> str: ...


def safe_rel(value: Any, what: str, error: type[Exception]) -> str:
    """A manifest path, normalised ('a//./b' -> 'a/b'); absolute, '..', NUL or empty raise `error`."""
    text = str(value or "")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts or text.startswith("/") or ".." in parts or "\x00" in text:
        raise error(f"manifest.json names an unsafe {what} {text!r}")
    return "/".join(parts)


def check_file(shown: str, listed: Mapping[str, Any], info: StagedFile, error: type[Exception]) -> None:
    """The staged file `shown` (as messages name it) has the size and sha256 its manifest record gives."""
    if listed.get("size") is not None and int(listed["size"]) != info.size:
        raise error(f"manifest.json says {shown} has {listed['size']} bytes, the layer holds {info.size}")
    if listed.get("sha256") and listed["sha256"] != info.sha256:
        raise error(f"manifest.json sha256 of {shown} does not match the layer")

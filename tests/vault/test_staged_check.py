"""The shared manifest-vs-staging checks raise the caller's error type with the caller's wording."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest

from infercache.vault.file_writer import ExtractedFile, UnsafeImageError
from infercache.vault.inductor import ManifestMismatch
from infercache.vault.staged_check import check_file, safe_rel


@pytest.mark.parametrize("error", [UnsafeImageError, ManifestMismatch])
def test_safe_rel_normalises_and_refuses_escapes(error: type[Exception]) -> None:
    assert safe_rel("a//./b/", "entry path", error) == "a/b"
    for bad in ("", None, ".", "/etc", "a/../../x", "..", "a\x00b"):
        with pytest.raises(error, match="manifest.json names an unsafe entry path"):
            safe_rel(bad, "entry path", error)


@pytest.mark.parametrize("error", [UnsafeImageError, ManifestMismatch])
def test_check_file_compares_size_and_sha256(error: type[Exception]) -> None:
    info = ExtractedFile(3, hashlib.sha256(b"elf").hexdigest())
    check_file("k/a.so", {"name": "a.so", "size": 3, "sha256": info.sha256}, info, error)
    check_file("k/a.so", {"name": "a.so"}, info, error)  # nothing recorded, nothing to compare
    with pytest.raises(error, match=r"k/a.so has 4 bytes, the layer holds 3"):
        check_file("k/a.so", {"name": "a.so", "size": 4}, info, error)
    with pytest.raises(error, match=r"sha256 of k/a.so does not match"):
        check_file("k/a.so", {"name": "a.so", "sha256": "0" * 64}, info, error)
    with pytest.raises(error, match="sha256"):
        check_file("k/a.so", {"size": 3, "sha256": "0" * 64}, SimpleNamespace(size=3, sha256=info.sha256), error)

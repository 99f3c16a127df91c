"""Tokenizers for the controller's `/tokenize`: the model's own, or a documented byte-level fallback.

Lookups only hit when the controller tokenizes exactly as the model does, so the server loads the
model's tokenizer when told where it is (a `tokenizer.json` file or a transformers tokenizer
directory, read offline). Without one it uses the byte-level fallback: one token per UTF-8 byte,
token id = byte value (0-255). `byte_level_tokenizer()` builds the same mapping as a real
`PreTrainedTokenizerFast`, so a model trained or initialised with a 256-token vocabulary and the
fallback agree token for token (the demo and the tests use that; nothing is downloaded).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

from infercache.errors import BadInputError

log = logging.getLogger(__name__)

BYTE_VOCAB_SIZE = 256


@runtime_checkable
class Tokenizer(Protocol):
    """What the controller needs from a tokenizer."""

    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """The fallback: UTF-8 bytes are the tokens (ids 0-255); no special tokens, no normalisation."""

    name = "byte-level"
    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="surrogatepass"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")


class _TokenizersJson:
    """A `tokenizers` tokenizer read from a tokenizer.json file (no special tokens added)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(str(path))
        self.name = str(path)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode([int(i) for i in ids]))


class _TransformersTokenizer:
    """A transformers tokenizer (any object with `encode`/`decode`), used without special tokens.

    ManagedGenerator tokenizes the same way, so the ids the controller returns are the ids whose
    KV the engine stored.
    """

    def __init__(self, tokenizer: Any, name: str) -> None:
        self._tok = tokenizer
        self.name = name

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._tok.encode(text, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode([int(i) for i in ids]))


def wrap_tokenizer(tokenizer: Any) -> Tokenizer:
    """Our Tokenizer view of a transformers tokenizer (or anything with encode/decode)."""
    if isinstance(tokenizer, (ByteTokenizer, _TokenizersJson, _TransformersTokenizer)):
        return tokenizer
    if not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode")):
        raise BadInputError(f"not a tokenizer (needs encode/decode): {type(tokenizer).__name__}")
    return _TransformersTokenizer(tokenizer, getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def load_tokenizer(source: str | os.PathLike[str] | None = None) -> Tokenizer:
    """The tokenizer at `source` (a tokenizer.json file or a tokenizer directory), else the byte fallback.

    Nothing is downloaded: a directory is read with `local_files_only=True`.
    """
    if source is None or str(source) == "":
        return ByteTokenizer()
    path = Path(source).expanduser()
    if path.is_file():
        try:
            return _TokenizersJson(path)
        except Exception as exc:  # tokenizers raises its own Exception type on bad JSON
            raise BadInputError(f"cannot read tokenizer file {path}: {exc}") from None
    if path.is_dir():
        if (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            return load_tokenizer(path / "tokenizer.json")
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise BadInputError(f"cannot load a tokenizer from {path}: {exc}") from None
        return _TransformersTokenizer(tok, str(path))
    raise BadInputError(f"tokenizer not found: {path} (give a tokenizer.json file or a tokenizer directory)")


def byte_level_tokenizer() -> Any:
    """A real transformers `PreTrainedTokenizerFast` whose ids equal the fallback's (id = UTF-8 byte).

    Built offline from a `tokenizers` byte-level BPE with an empty merge list, so it needs no
    download; pair it with a model whose vocabulary has 256 entries.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(BYTE_VOCAB_SIZE)}
    assert set(vocab) == set(alphabet)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: the whole text maps to bytes, exactly like ByteTokenizer (spaces included).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (the ByteLevel pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}

"""The controller's tokenizers: the byte-level fallback, a real PreTrainedTokenizerFast with the same ids,
tokenizer.json files and tokenizer directories (written here, nothing downloaded)."""

from __future__ import annotations

import pytest

from tests.helpers import require_module

from infercache.errors import BadInputError
from infercache.kv.tokenizer import ByteTokenizer, load_tokenizer

TEXTS = ["hello world", "  two  spaces\n\ttab", "héllo ✓ 日本語", ""]


def test_fallback_is_utf8_bytes():
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer)
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_byte_level_fast_tokenizer_matches_the_fallback(tmp_path):
    require_module("transformers")
    from infercache.kv.tokenizer import byte_level_tokenizer

    fast = byte_level_tokenizer()
    fallback = ByteTokenizer()
    for text in TEXTS:
        ids = fast.encode(text, add_special_tokens=False)
        assert ids == fallback.encode(text)
        assert fast.decode(ids) == text
    # Saved as a directory and as a tokenizer.json file, it loads back with the same ids.
    fast.save_pretrained(tmp_path / "tok")
    for source in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        loaded = load_tokenizer(source)
        for text in TEXTS:
            assert loaded.encode(text) == fallback.encode(text)
            assert loaded.decode(loaded.encode(text)) == text


def test_missing_or_bad_tokenizer_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(BadInputError, match="cannot read"):
        load_tokenizer(bad)


def test_a_lone_surrogate_is_bad_input_for_a_real_tokenizer(tmp_path, engine):
    """JSON may carry "\\ud800"; `tokenizers` refuses it with a TypeError, which must be a 422, not a 500."""
    require_module("transformers")
    from fastapi.testclient import TestClient

    from infercache.kv.client import ControllerBadInput, LocalController
    from infercache.kv.server import create_app
    from infercache.kv.tokenizer import byte_level_tokenizer

    byte_level_tokenizer().save_pretrained(tmp_path / "tok")
    for source in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        controller = LocalController(engine, tokenizer=source)
        assert controller.tokenize("ab") == [97, 98]
        with pytest.raises(ControllerBadInput, match="prompt: not valid Unicode"):
            controller.tokenize("a\ud800b")
        with TestClient(create_app(controller).app) as http:
            resp = http.post("/tokenize", content=b'{"prompt": "a\\ud800b"}', headers={"content-type": "application/json"})
            assert resp.status_code == 422 and "not valid Unicode" in resp.json()["detail"]
    assert LocalController(engine).tokenize("a\ud800b") == [97, 0xED, 0xA0, 0x80, 98]  # the byte fallback takes it

"""Keys (deterministic chained hashes) and LMCache's mask rule."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import require_module

from infercache.kv.tokens import TokenDatabase, mask_start, to_token_array
from tests.kv.engine.conftest import kv_for

SCRIPT = (
    "from infercache.kv.tokens import TokenDatabase\n"
    "db = TokenDatabase(4, 'llama', 2, 1, 'float16', ('lora7',))\n"
    "print('\\n'.join(db.keys(list(range(1, 14)))))\n"
)


def test_keys_are_identical_in_processes_with_different_hash_seeds() -> None:
    outputs = []
    for seed in ("1", "2", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True)
        outputs.append(done.stdout.split())
    assert outputs[0] == outputs[1] == outputs[2]
    assert outputs[0] == TokenDatabase(4, "llama", 2, 1, "float16", ("lora7",)).keys(list(range(1, 14)))
    assert len(outputs[0]) == 3  # 13 tokens, chunk 4: three full chunks, no partial one


def test_key_carries_model_world_worker_hash_dtype_tags() -> None:
    key = TokenDatabase(4, "llama", 2, 1, "bfloat16", ("lora7", "salt")).keys([1, 2, 3, 4])[0]
    model, world, worker, digest, dtype, tags = key.split("@")
    assert (model, world, worker, dtype, tags) == ("llama", "2", "1", "bfloat16", "lora7,salt")
    assert len(digest) == 32 and int(digest, 16) >= 0


def test_hash_chains_over_the_prefix_and_extra_keys() -> None:
    db = TokenDatabase(4, "m")
    a = db.keys([1, 2, 3, 4, 5, 6, 7, 8])
    b = db.keys([9, 9, 9, 9, 5, 6, 7, 8])
    assert a[0] != b[0] and a[1] != b[1]  # same second-chunk tokens, different prefix
    assert db.keys([1, 2, 3, 4]) == a[:1]
    assert TokenDatabase(4, "m", tags=("salt",)).keys([1, 2, 3, 4]) != a[:1]
    assert TokenDatabase(4, "m", worker_id=0, world_size=2).keys([1, 2, 3, 4]) != a[:1]
    assert db.keys(np.array([1, 2, 3, 4], dtype=np.int64)) == db.keys([1, 2, 3, 4])


def test_save_unfull_chunk_keys_the_partial_last_chunk() -> None:
    assert len(TokenDatabase(4, "m").keys(list(range(10)))) == 2
    partial = TokenDatabase(4, "m", save_unfull_chunk=True).keys(list(range(10)))
    assert len(partial) == 3 and partial[:2] == TokenDatabase(4, "m").keys(list(range(10)))


def test_bad_tokens() -> None:
    with pytest.raises(ValueError, match="1-D"):
        to_token_array([[1, 2]])
    with pytest.raises(ValueError, match="integers"):
        to_token_array([1.5, 2.0])
    with pytest.raises(ValueError, match="2\\*\\*32"):
        to_token_array([-1])


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (None, 0),
        ([True] * 8, 0),
        ([False] * 4 + [True] * 4, 4),
        ([False] * 8, 8),
        (np.array([0, 0, 0, 0, 1, 1, 1, 1]), 4),
    ],
)
def test_valid_masks(mask: object, expected: int) -> None:
    assert mask_start(mask, 8, 4) == expected


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        ([False] * 3 + [True] * 5, "multiple of the chunk size"),
        ([True] * 4 + [False] * 4, "F...FT...T"),
        ([False, True] * 4, "F...FT...T"),
        ([True] * 7, "length 8"),
        ([2] * 8, "boolean"),
    ],
)
def test_invalid_masks_raise(mask: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mask_start(mask, 8, 4)


def test_torch_mask_and_tokens() -> None:
    torch = require_module("torch")
    assert mask_start(torch.tensor([False] * 4 + [True] * 4), 8, 4) == 4
    assert TokenDatabase(4, "m").keys(torch.arange(8)) == TokenDatabase(4, "m").keys(list(range(8)))


def test_store_and_retrieve_with_masks(make_engine) -> None:
    engine = make_engine()
    tokens = list(range(100, 112))
    kv = kv_for(12)
    # only the chunks after the first are stored: the prefix is missing, so lookup sees nothing
    assert engine.store(tokens, kv, mask=[False] * 4 + [True] * 8) == 8
    assert engine.lookup(tokens) == 0
    mask, out = engine.retrieve(tokens, mask=[False] * 4 + [True] * 8)
    assert mask.tolist() == [False] * 4 + [True] * 8
    assert np.array_equal(out, kv[:, :, 4:])
    with pytest.raises(ValueError, match="multiple of the chunk size"):
        engine.store(tokens, kv, mask=[False] * 2 + [True] * 10)
    with pytest.raises(ValueError, match="F...FT...T"):
        engine.retrieve(tokens, mask=[True] * 4 + [False] * 8)
    assert engine.store(tokens, kv, mask=[False] * 12) == 0


def test_remembered_chunk_keys_match_fresh_ones() -> None:
    db = TokenDatabase(4, "m")
    tokens = to_token_array(list(range(50)))  # 12 chunks: long enough to be remembered
    first = db.chunks(tokens)
    again = db.chunks(tokens, start=8)
    fresh = TokenDatabase(4, "m").chunks(tokens)
    assert first == fresh and again == fresh[2:] and len(db._memo) == 1
    other = to_token_array([7] + list(range(1, 50)))
    assert db.chunks(other)[0].key != first[0].key and len(db._memo) == 2


def test_remembered_keys_are_exact_under_a_checksum_collision_and_bounded(monkeypatch) -> None:
    """The memo finds a sequence by length and crc32 but confirms it token by token: two
    sequences with the same checksum still get their own keys. It holds MEMO_TOKENS at most."""
    from infercache.kv import tokens as tokens_module

    import types

    # every sequence collides; only tokens.py's view of zlib changes (not every crc32 in the process)
    monkeypatch.setattr(tokens_module, "zlib", types.SimpleNamespace(crc32=lambda data: 7))
    db = TokenDatabase(4, "m")
    a = to_token_array(list(range(40)))
    b = to_token_array([9] + list(range(1, 40)))
    fresh = TokenDatabase(4, "m")
    for _ in range(2):
        assert db.chunks(a) == fresh.chunks(a)
        assert db.chunks(b) == fresh.chunks(b)
    assert len(db._memo) == 1  # the newer one replaced the older one in the slot
    monkeypatch.undo()
    monkeypatch.setattr(tokens_module, "MEMO_TOKENS", 100)
    small = TokenDatabase(4, "m")
    for i in range(5):
        small.chunks(to_token_array([i] * 40))
    assert len(small._memo) == 2 and small._memo_tokens == 80
    small.chunks(to_token_array([0] * 200))  # longer than the whole memo: not remembered
    assert len(small._memo) == 2 and small._memo_tokens == 80

"""Token database: tokens → chunk keys, chained prefix hashes, and LMCache's mask rule.

Chunk i's hash is ``sha256(parent_hash ‖ token bytes of chunk i)`` where the tokens are
little-endian uint32 and the root parent hash covers a version tag plus the extra keys (LoRA
id, cache salt: `tags`). Canonical bytes and a cryptographic hash make keys identical in
every process and on every host (LMCache's Python `hash` differs per process unless
PYTHONHASHSEED is fixed: its most common "zero hits" report). A cache key carries model
name, world size, worker id, the chunk hash, KV dtype and tags:
``model@world_size@worker@hash@dtype[@tags]``.
"""

from __future__ import annotations

import array
import hashlib
import threading
import zlib
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, NamedTuple

from infercache.errors import BadInputError

if TYPE_CHECKING:
    import numpy as np

HASH_VERSION = b"infercache-kv-chunk-v1"
MEMO_SIZE = 16  # token sequences whose chunk keys are remembered ...
MEMO_TOKENS = 4 << 20  # ... holding at most this many tokens in all (16 MiB of copies)
MEMO_MIN_CHUNKS = 8
_UINT32 = array.array("I")
KEY_HASH_BYTES = 16  # hex digits in a key: 32 (128 bits of the 256-bit chain hash)


class Chunk(NamedTuple):
    """One chunk of a token sequence: tokens [start, end) and its cache key."""

    start: int
    end: int
    key: str


def to_token_array(tokens: Any) -> "np.ndarray":
    """A 1-D uint32 little-endian numpy array of the tokens (list, numpy array or CPU torch tensor)."""
    import numpy as np

    if isinstance(tokens, (list, tuple)) and _UINT32.itemsize == 4:
        try:  # the fast path for Python lists: array('I') converts and range-checks in C
            return np.frombuffer(array.array("I", tokens), dtype="=u4").astype("<u4", copy=False)
        except (OverflowError, TypeError):
            pass  # negative, too large, floats, nested: the checks below name the problem
    if type(tokens).__module__.startswith("torch"):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise BadInputError(f"tokens must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        return np.empty(0, dtype="<u4")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise BadInputError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() > 0xFFFFFFFF:
        raise BadInputError("token ids must be in [0, 2**32)")
    return np.ascontiguousarray(arr, dtype="<u4")


def mask_start(mask: Any, n_tokens: int, chunk_size: int) -> int:
    """Number of leading Falses of an ``F...FT...T`` mask; ValueError if the mask breaks the rule.

    The rule (LMCache's): same length as the tokens, Falses only as a prefix, and their number a
    multiple of the chunk size (a chunk cannot be half-cached).
    """
    import numpy as np

    if mask is None:
        return 0
    if type(mask).__module__.startswith("torch"):
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask)
    if m.ndim != 1 or len(m) != n_tokens:
        raise BadInputError(f"mask must be 1-D of the tokens' length {n_tokens}, got shape {tuple(m.shape)}")
    if m.dtype != np.bool_:
        if m.dtype.kind not in "iub" or not np.isin(m, (0, 1)).all():
            raise BadInputError(f"mask must be boolean, got dtype {m.dtype}")
        m = m.astype(bool)
    n_false = int(np.argmax(m)) if m.any() else n_tokens
    if not m[n_false:].all():
        raise BadInputError("mask must look like F...FT...T (Falses only as a prefix)")
    if n_false % chunk_size:
        raise BadInputError(f"mask has {n_false} leading Falses, not a multiple of the chunk size {chunk_size}")
    return n_false


class TokenDatabase:
    """Chunks a token sequence and names each chunk by its chained prefix hash."""

    def __init__(
        self,
        chunk_size: int = 256,
        model_name: str = "model",
        world_size: int = 1,
        worker_id: int = 0,
        kv_dtype: str = "auto",
        tags: tuple[str, ...] = (),
        save_unfull_chunk: bool = False,
    ) -> None:
        self.chunk_size = chunk_size
        self.save_unfull_chunk = save_unfull_chunk
        self.tags = tuple(tags)
        self.key_prefix = f"{model_name}@{world_size}@{worker_id}@"
        self.key_suffix = f"@{kv_dtype}" + (f"@{','.join(self.tags)}" if self.tags else "")
        root = hashlib.sha256(HASH_VERSION)
        for tag in self.tags:
            encoded = tag.encode()
            root.update(len(encoded).to_bytes(4, "little") + encoded)
        self.root_hash = root.digest()
        # (length, crc32) -> (a copy of the tokens, their chunks); the copy makes a hit exact
        self._memo: OrderedDict[tuple[int, int], tuple[Any, list[Chunk]]] = OrderedDict()
        self._memo_tokens = 0
        self._memo_lock = threading.Lock()

    def chunk_hashes(self, tokens: "np.ndarray") -> list[bytes]:
        """The chain hash of every chunk (the partial last one too when save_unfull_chunk)."""
        n = len(tokens)
        cs = self.chunk_size
        stop = n if self.save_unfull_chunk else n - n % cs
        mv = memoryview(tokens.view("u1"))
        step = cs * 4
        parent = self.root_hash
        sha = hashlib.sha256
        out = []
        for off in range(0, stop * 4, step):
            h = sha(parent)
            h.update(mv[off : min(off + step, stop * 4)])
            parent = h.digest()
            out.append(parent)
        return out

    def chunks(self, tokens: "np.ndarray", start: int = 0) -> list[Chunk]:
        """Chunks covering tokens from chunk-aligned `start`; keys chain over the whole prefix.

        Long sequences are remembered (a few): a prompt is usually looked up, then retrieved,
        then stored, and the chain is computed once for the three. A remembered sequence is
        found by length and crc32 (a quarter of a sha256 of the tokens, which a first lookup
        would pay for nothing) and confirmed by comparing the tokens themselves.
        """
        import numpy as np

        cs = self.chunk_size
        n = len(tokens)
        first = start // cs
        memo_key = None
        if n >= MEMO_MIN_CHUNKS * cs:
            memo_key = (n, zlib.crc32(tokens.view("u1")))
            with self._memo_lock:
                hit = self._memo.get(memo_key)
                if hit is not None and np.array_equal(hit[0], tokens):
                    self._memo.move_to_end(memo_key)
                    return hit[1][first:]
        pre, suf = self.key_prefix, self.key_suffix
        out = [
            Chunk(s, s + cs if s + cs <= n else n, pre + d[:KEY_HASH_BYTES].hex() + suf)
            for s, d in zip(range(0, n, cs), self.chunk_hashes(tokens))
        ]
        if memo_key is not None and n <= MEMO_TOKENS:
            with self._memo_lock:
                old = self._memo.pop(memo_key, None)  # a crc32 collision: the newer sequence wins
                self._memo_tokens += n - (len(old[0]) if old is not None else 0)
                self._memo[memo_key] = (tokens.copy(), out)
                while self._memo and (len(self._memo) > MEMO_SIZE or self._memo_tokens > MEMO_TOKENS):
                    self._memo_tokens -= len(self._memo.popitem(last=False)[1][0])
        return out[first:]

    def forget(self) -> None:
        """Drop the remembered sequences (what a prompt's first lookup sees; for benchmarks)."""
        with self._memo_lock:
            self._memo.clear()
            self._memo_tokens = 0

    def keys(self, tokens: Any) -> list[str]:
        """Cache keys of a token sequence (any accepted token form)."""
        return [c.key for c in self.chunks(to_token_array(tokens))]

"""Block allocator whose whole state lives in a shared buffer: TLSF-style segregated fits.

Why this shape: alloc and free must cost O(1) whatever the pool size (the old tool scanned a
bitmap), every process must see the same state (so no Python objects: only int arrays in
the mapping), and a crash must be repairable from the entry table alone (so the state is
*derived*: `rebuild` recomputes it from the used extents).

Free extents are kept in 32 x 8 size classes (first level: power of two, second level:
eighths of it), each a doubly linked list threaded through per-block tags; two bitmaps
find the first non-empty class >= a request in O(1). Boundary tags at both ends of every
free extent let `free` coalesce with its neighbours in O(1). Each block has 4 int32 tags
(head length, tail -> start, next, prev), interleaved so one block's tags share a cache
line: on a 64 GiB pool the tags span 256 MiB and separate arrays cost 2x in cache and
TLB misses. Tags use 0 for "nothing" (values are stored +1) so a freshly truncated,
sparse file is a valid all-zero start and untouched pages of a huge pool are never written.

Hand-written because no maintained Python library keeps an allocator inside a shared
mapping; the arithmetic is the classic TLSF scheme (Masmano et al., 2004).
"""

from __future__ import annotations

from typing import Iterable

SL_LOG2 = 3
SL_COUNT = 1 << SL_LOG2
FL_COUNT = 32
N_CLASSES = FL_COUNT * SL_COUNT

# header words (int64) of the allocator region
A_FREE = 0  # free blocks
A_N_BLOCKS = 1
A_FL_BITMAP = 2
A_SL_BITMAPS = 3  # FL_COUNT words
A_HEADS = A_SL_BITMAPS + FL_COUNT  # N_CLASSES words: first extent start + 1
A_HEADER_WORDS = A_HEADS + N_CLASSES
A_HEADER_BYTES = 4096
assert A_HEADER_WORDS * 8 <= A_HEADER_BYTES

MAX_BLOCKS = (1 << 31) - 2  # int32 arrays store block + 1


def _mapping(n: int) -> tuple[int, int]:
    """Size class (first level, second level) that holds a free extent of `n` blocks."""
    if n < SL_COUNT:
        return 0, n
    b = n.bit_length() - 1
    return b - SL_LOG2 + 1, (n >> (b - SL_LOG2)) - SL_COUNT


class Allocator:
    """alloc(n) -> first block or -1; free(start, n). Not thread-safe: callers hold the pool lock."""

    __slots__ = ("_h", "_m", "n_blocks")

    @staticmethod
    def metadata_bytes(n_blocks: int) -> int:
        """Bytes of shared state needed for `n_blocks` blocks (4 int32 arrays + header)."""
        return A_HEADER_BYTES + _arr_bytes(16 * n_blocks)

    def __init__(self, buf: memoryview, n_blocks: int, *, init: bool = False) -> None:
        """Attach to the state in `buf` (writable, metadata_bytes long); `init` formats it empty."""
        if not 0 < n_blocks <= MAX_BLOCKS:
            raise ValueError(f"n_blocks must be in 1..{MAX_BLOCKS}, got {n_blocks}")
        self.n_blocks = n_blocks
        self._h = buf[:A_HEADER_BYTES].cast("q")
        self._m = buf[A_HEADER_BYTES : A_HEADER_BYTES + 16 * n_blocks].cast("i")
        if init:
            for i in range(A_HEADER_WORDS):
                self._h[i] = 0
            self._h[A_N_BLOCKS] = n_blocks
            self._insert(0, n_blocks)
            self._h[A_FREE] = n_blocks

    def release(self) -> None:
        """Drop the views on the buffer so the mapping can be closed."""
        self._h.release()
        self._m.release()

    @property
    def free_blocks(self) -> int:
        return self._h[A_FREE]

    # ---------------------------------------------------------------- lists
    # (_mapping is inlined in _insert/_remove: they run 2-4 times per alloc or free, and
    # Python call overhead, not memory, is what an operation costs at any pool size)
    def _insert(self, s: int, n: int) -> None:
        if n < SL_COUNT:
            fl, sl = 0, n
        else:
            b = n.bit_length() - 1
            fl, sl = b - SL_LOG2 + 1, (n >> (b - SL_LOG2)) - SL_COUNT
        h = self._h
        m = self._m
        slot = A_HEADS + fl * SL_COUNT + sl
        head = h[slot]
        t = s * 4
        m[t] = n
        m[t + 2] = head
        m[t + 3] = 0
        if head:
            m[(head - 1) * 4 + 3] = s + 1
        h[slot] = s + 1
        h[A_SL_BITMAPS + fl] |= 1 << sl
        h[A_FL_BITMAP] |= 1 << fl
        m[(s + n - 1) * 4 + 1] = s + 1

    def _remove(self, s: int, n: int) -> None:
        m = self._m
        t = s * 4
        p = m[t + 3]
        x = m[t + 2]
        if p:
            m[(p - 1) * 4 + 2] = x
        else:
            if n < SL_COUNT:
                fl, sl = 0, n
            else:
                b = n.bit_length() - 1
                fl, sl = b - SL_LOG2 + 1, (n >> (b - SL_LOG2)) - SL_COUNT
            h = self._h
            h[A_HEADS + fl * SL_COUNT + sl] = x
            if not x:
                bits = h[A_SL_BITMAPS + fl] & ~(1 << sl)
                h[A_SL_BITMAPS + fl] = bits
                if not bits:
                    h[A_FL_BITMAP] &= ~(1 << fl)
        if x:
            m[(x - 1) * 4 + 3] = p
        m[t] = 0
        m[t + 2] = 0
        m[t + 3] = 0
        m[(s + n - 1) * 4 + 1] = 0

    # ---------------------------------------------------------------- public
    def alloc(self, n: int) -> int:
        """First block of a free run of `n` blocks, or -1 when no free extent is large enough."""
        if n <= 0 or n > self._h[A_FREE]:
            return -1
        h = self._h
        if n < SL_COUNT:
            fl, sl = 0, n
        else:  # round up to the next class boundary: every extent found there is >= n
            fl, sl = _mapping(n + (1 << (n.bit_length() - 1 - SL_LOG2)) - 1)
        if fl >= FL_COUNT:
            return self._fallback(n)
        bits = h[A_SL_BITMAPS + fl] & (-1 << sl)
        if not bits:
            flbits = h[A_FL_BITMAP] & (-1 << (fl + 1))
            if not flbits:
                return self._fallback(n)
            fl = (flbits & -flbits).bit_length() - 1
            bits = h[A_SL_BITMAPS + fl]
        sl = (bits & -bits).bit_length() - 1
        s = h[A_HEADS + fl * SL_COUNT + sl] - 1
        length = self._m[s * 4]  # _take, inlined
        self._remove(s, length)
        if length > n:
            self._insert(s + n, length - n)
        h[A_FREE] -= n
        return s

    def _take(self, s: int, n: int) -> int:
        length = self._m[s * 4]
        self._remove(s, length)
        if length > n:
            self._insert(s + n, length - n)
        self._h[A_FREE] -= n
        return s

    def _fallback(self, n: int) -> int:
        """The class holding `n` itself may have an extent >= n: look at a bounded number of them."""
        fl, sl = _mapping(n)
        s = self._h[A_HEADS + fl * SL_COUNT + sl] - 1
        steps = 0
        while s >= 0 and steps < 64:
            if self._m[s * 4] >= n:
                return self._take(s, n)
            s = self._m[s * 4 + 2] - 1
            steps += 1
        return -1

    def free(self, s: int, n: int) -> None:
        """Return blocks [s, s+n) (which the caller allocated), merging with free neighbours."""
        if n <= 0:
            return
        m = self._m
        self._h[A_FREE] += n
        if s > 0:
            left = m[(s - 1) * 4 + 1]
            if left:
                ls = left - 1
                self._remove(ls, s - ls)
                n += s - ls
                s = ls
        e = s + n
        if e < self.n_blocks:
            rn = m[e * 4]
            if rn:
                self._remove(e, rn)
                n += rn
        self._insert(s, n)

    def largest_free(self) -> int:
        """Upper bound class of the largest free extent (exact length of one extent in it)."""
        flbits = self._h[A_FL_BITMAP]
        if not flbits:
            return 0
        fl = flbits.bit_length() - 1
        sl = self._h[A_SL_BITMAPS + fl].bit_length() - 1
        s = self._h[A_HEADS + fl * SL_COUNT + sl] - 1
        best = 0
        steps = 0
        while s >= 0 and steps < 64:
            best = max(best, self._m[s * 4])
            s = self._m[s * 4 + 2] - 1
            steps += 1
        return best

    # ---------------------------------------------------------------- derived state
    def free_extents(self) -> list[tuple[int, int]]:
        """Every free extent (start, length) found by walking the class lists (for check)."""
        out = []
        limit = self.n_blocks + 1
        for c in range(N_CLASSES):
            s = self._h[A_HEADS + c] - 1
            steps = 0
            while s >= 0 and steps < limit:
                out.append((s, self._m[s * 4]))
                s = self._m[s * 4 + 2] - 1
                steps += 1
        return out

    def check(self, used: Iterable[tuple[int, int]]) -> list[str]:
        """Problems found when comparing the allocator with the used extents (empty list = consistent)."""
        import numpy as np

        problems: list[str] = []
        n_blocks = self.n_blocks
        h = self._h
        if h[A_N_BLOCKS] != n_blocks:
            problems.append(f"allocator geometry says {h[A_N_BLOCKS]} blocks, pool has {n_blocks}")
            return problems
        free: list[tuple[int, int]] = []
        seen: set[int] = set()
        for c in range(N_CLASSES):
            fl, sl = divmod(c, SL_COUNT)
            s = h[A_HEADS + c] - 1
            bit = bool(h[A_SL_BITMAPS + fl] >> sl & 1)
            if bit != (s >= 0):
                problems.append(f"size class {fl}/{sl}: bitmap says {'non-' if bit else ''}empty, list disagrees")
            prev = -1
            while s >= 0:
                if s >= n_blocks or s in seen:
                    problems.append(f"size class {fl}/{sl}: list broken at block {s}")
                    break
                seen.add(s)
                length = self._m[s * 4]
                if length <= 0 or s + length > n_blocks:
                    problems.append(f"free extent at block {s} has bad length {length}")
                    break
                if _mapping(length) != (fl, sl):
                    problems.append(f"free extent {s}+{length} filed in the wrong size class {fl}/{sl}")
                if self._m[(s + length - 1) * 4 + 1] != s + 1:
                    problems.append(f"free extent {s}+{length}: end tag does not point back")
                if self._m[s * 4 + 3] - 1 != prev:
                    problems.append(f"free extent {s}: back link {self._m[s * 4 + 3] - 1} != {prev}")
                free.append((s, length))
                prev = s
                s = self._m[s * 4 + 2] - 1
        for fl in range(FL_COUNT):
            if bool(h[A_FL_BITMAP] >> fl & 1) != bool(h[A_SL_BITMAPS + fl]):
                problems.append(f"first-level bitmap bit {fl} disagrees with its classes")
        tags = np.frombuffer(self._m, dtype=np.int32).reshape(-1, 4)
        heads = np.flatnonzero(tags[:, 0])
        if len(heads) != len(free):
            problems.append(f"{len(heads)} blocks carry a free-extent tag but the lists hold {len(free)} extents")
        tails = np.flatnonzero(tags[:, 1])
        if len(tails) != len(free):
            problems.append(f"{len(tails)} end tags but the lists hold {len(free)} extents")
        free_total = sum(length for _, length in free)
        if free_total != h[A_FREE]:
            problems.append(f"free counter {h[A_FREE]} != {free_total} blocks in the free lists")
        extents = sorted([(s, n, "free") for s, n in free] + [(s, n, "used") for s, n in used if n > 0])
        pos = 0
        prev_kind = ""
        for s, n, kind in extents:
            if s < pos:
                problems.append(f"{kind} extent {s}+{n} overlaps the extent before it (ends at {pos})")
            elif s > pos:
                problems.append(f"blocks {pos}..{s - 1} are neither free nor used (leaked)")
            elif kind == "free" and prev_kind == "free":
                problems.append(f"free extents not coalesced at block {s}")
            pos = max(pos, s + n)
            prev_kind = kind
        if pos != n_blocks:
            problems.append(f"extents end at block {pos}, pool has {n_blocks} (free + used != capacity)")
        return problems

    def rebuild(self, used: Iterable[tuple[int, int]]) -> None:
        """Recompute everything from the used extents (which must not overlap)."""
        import numpy as np

        view = np.frombuffer(self._m, dtype=np.int32)
        nz = np.flatnonzero(view)  # zero only what is set: a sparse pool stays sparse
        view[nz] = 0
        del view
        h = self._h
        for i in range(A_HEADER_WORDS):
            h[i] = 0
        h[A_N_BLOCKS] = self.n_blocks
        pos = 0
        free_total = 0
        for s, n in sorted(used):
            if n <= 0:
                continue
            if s > pos:
                self._insert(pos, s - pos)
                free_total += s - pos
            pos = max(pos, s + n)
        if pos < self.n_blocks:
            self._insert(pos, self.n_blocks - pos)
            free_total += self.n_blocks - pos
        h[A_FREE] = free_total


def _arr_bytes(nbytes: int) -> int:
    return (nbytes + 4095) // 4096 * 4096

"""Copy-out rules for `Pool` reads: an `expect(size)` check and a `copy(view)` per read kind.

A read looks up and copies in one locked section (pool.py `_read`); `expect` refuses a value
before anything is copied (its message is raised once the lock is released), `copy` moves the
bytes out of the mapping. Kept here so the hot path in pool.py stays short.
"""

from __future__ import annotations

import math
from typing import Any, Callable

Expect = Callable[[int], "str | None"]
Copy = Callable[[memoryview], Any]


def into_buffer(out: Any) -> tuple[Expect, Copy]:
    """Copy into the writable buffer `out` (no allocation); the copy returns the value's size."""
    target = memoryview(out).cast("B") if not isinstance(out, memoryview) else out.cast("B")

    def expect(size: int) -> str | None:
        if size > target.nbytes:
            return f"buffer of {target.nbytes} bytes is too small for a {size}-byte value"
        return None

    def copy(view: memoryview) -> int:
        target[: len(view)] = view
        return len(view)

    return expect, copy


def into_array(dtype: Any, shape: Any) -> tuple[Expect, Copy]:
    """Copy into a new numpy array of `dtype` and `shape` (1-D when None), allocated once the size is known."""
    import numpy as np

    dt = np.dtype(dtype)
    result: dict[str, Any] = {}

    def expect(size: int) -> str | None:
        if shape is None:
            if size % dt.itemsize:
                return f"value of {size} bytes is not a whole number of {dt} items"
            shp: tuple[int, ...] = (size // dt.itemsize,)
        else:
            shp = tuple(shape) if isinstance(shape, (tuple, list)) else (int(shape),)
            if math.prod(shp) * dt.itemsize != size:
                return f"value of {size} bytes does not match dtype {dt} and shape {shp}"
        result["arr"] = np.empty(shp, dtype=dt)
        return None

    def copy(view: memoryview) -> Any:
        arr = result["arr"]
        if view.nbytes:
            arr.reshape(-1).view(np.uint8)[:] = np.frombuffer(view, dtype=np.uint8)
        return arr

    return expect, copy

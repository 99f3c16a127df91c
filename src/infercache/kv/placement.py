"""TTL placement heuristics (seed 004): how long a KV prefix stays in a tier, and which tier.

    ttl = base_ttl × (1 + alpha·ln(1 + access_count)) × (1 + perplexity_factor) × (1 − gamma·time_variance)

clamped to [min_ttl, max_ttl]. Our constants, chosen so the seed's worked example holds
(perplexity 15, time variance 0.05, first access → 3600 × 1.08 × 0.95 ≈ 3694 s, hot tier):

- ``gamma = 1.0``: a prompt whose timing is fully random (time_variance 1) gets min_ttl;
- ``perplexity_factor = min(perplexity, 100) / perplexity_scale`` with ``perplexity_scale = 187.5``:
  +8 % at perplexity 15, +53 % at the top of the typical 10-100 range. A hard prompt is as
  expensive to recompute as an easy one, but its KV is less likely to be rebuilt from a
  nearby prefix, so it is kept a little longer (in a colder tier, see select_backend).

Tier names: the seed says ``gpu | disk | remote``; our engine's tiers are ``hot | disk | remote``
(``gpu`` and ``cpu`` are aliases of ``hot``: the hot tier is the shared-memory pool).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Any, Hashable, Mapping

from infercache.errors import BadInputError

LOCATIONS: tuple[str, ...] = ("hot", "disk", "remote")
_ALIASES = {"hot": "hot", "gpu": "hot", "cpu": "hot", "local_cpu": "hot", "disk": "disk", "local_disk": "disk",
            "remote": "remote"}  # fmt: skip
GAMMA = 1.0
PERPLEXITY_SCALE = 187.5
PERPLEXITY_CAP = 100.0
VARIANCE_THRESHOLD = 0.5  # select_backend: above this the prompt's timing is too random for the hot tier
REMOTE_FACTOR = 3.0  # select_backend: perplexity >= REMOTE_FACTOR × hot_threshold goes remote


def normalize_location(name: str) -> str:
    """'hot' | 'disk' | 'remote' for a location or one of its aliases (gpu, cpu); ValueError otherwise."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise BadInputError(f"unknown location {name!r} (expected one of: hot, disk, remote; aliases gpu, cpu)")
    return _ALIASES[key]


def _number(metadata: Mapping[str, Any], field: str, default: float) -> float:
    value = metadata.get(field, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInputError(f"metadata {field!r} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int past float range (10**400): as large as a float gets
        number = math.inf if value > 0 else -math.inf
    if math.isnan(number):
        raise BadInputError(f"metadata {field!r} must be a number, got {value!r}")
    if number < 0:
        raise BadInputError(f"metadata {field!r} must not be negative, got {value!r}")
    return number


def compute_ttl(
    metadata: Mapping[str, Any] | None,
    base_ttl: float = 3600,
    min_ttl: float = 30,
    max_ttl: float = 604800,
    alpha: float = 0.25,
    gamma: float = GAMMA,
    perplexity_scale: float = PERPLEXITY_SCALE,
) -> float:
    """Seconds a KV prefix should stay in its tier before moving one tier down (see module doc)."""
    md = metadata or {}
    perplexity = min(_number(md, "perplexity", 0.0), PERPLEXITY_CAP)
    variance = min(_number(md, "time_variance", 0.0), 1.0)
    count = _number(md, "access_count", 0.0)
    ttl = base_ttl * (1 + alpha * math.log1p(count)) * (1 + perplexity / perplexity_scale) * (1 - gamma * variance)
    return float(min(max(ttl, min_ttl), max_ttl))


def select_backend(
    metadata: Mapping[str, Any] | None, hot_threshold: float = 20.0, recent_seconds: float = 3600
) -> str:
    """'gpu' (hot) | 'disk' | 'remote', by the seed's rules.

    - gpu: perplexity below `hot_threshold`, accessed within `recent_seconds` (a first access,
      without `last_access`, counts as now) and time variance at most 0.5;
    - remote: perplexity at least 3 × `hot_threshold` (hard, rarely rebuilt prompts);
    - disk: everything else (moderate perplexity or random timing).
    """
    md = metadata or {}
    perplexity = _number(md, "perplexity", 0.0)
    variance = _number(md, "time_variance", 0.0)
    last = _number(md, "last_access", time.time())
    recent = time.time() - last <= recent_seconds
    if perplexity < hot_threshold and recent and variance <= VARIANCE_THRESHOLD:
        return "gpu"
    if perplexity >= REMOTE_FACTOR * hot_threshold:
        return "remote"
    return "disk"


class AccessLog:
    """Access count and last access time per prompt (the oldest forgotten past `cap`): what the
    heuristics' ``access_count`` and ``last_access`` are, for callers that do not pass them."""

    def __init__(self, cap: int = 100_000) -> None:
        self.cap = cap
        self._seen: OrderedDict[Hashable, tuple[int, float]] = OrderedDict()

    def note(self, key: Hashable) -> tuple[int, float | None]:
        """Record an access to `key`; returns (earlier accesses, time of the last one or None)."""
        count, last = self._seen.pop(key, (0, None))
        self._seen[key] = (count + 1, time.time())
        while len(self._seen) > self.cap:
            self._seen.popitem(last=False)
        return count, last

    def annotate(self, key: Hashable, metadata: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """Record an access; (accesses so far, this one included; a copy of `metadata` with
        access_count and last_access filled in unless given)."""
        count, last = self.note(key)
        meta = dict(metadata)
        meta.setdefault("access_count", count)
        if last is not None:
            meta.setdefault("last_access", last)
        return count + 1, meta

"""`EngineConfig`: the KV engine's settings, from keyword args, a YAML file or INFERCACHE_KV_* variables."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from infercache.errors import BadInputError
from infercache.kv.policies import POLICIES
from infercache.units import parse_size

REMOTE_SCHEMES = ("redis", "rediss", "unix", "redis-cluster")
WRITE_POLICIES = ("write_through", "write_back")
SERDES = ("none", "zstd")
KV_DTYPES = ("auto", "float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2")
ENV_PREFIX = "INFERCACHE_KV_"
_SIZES = ("local_cpu_size", "local_disk_size", "remote_size")


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one `Engine`; sizes accept '5G' and are kept as bytes.

    `pool_name` shares an existing (or named) hot pool; by default it is derived from model
    name, world size and worker id so engines of one model on a host share a hot tier.
    `kv_dtype` goes into every cache key ('auto': the key says auto, the chunk header keeps
    the real dtype). `tags` (LoRA id, cache salt, ...) go into keys and chunk hashes.
    `base_ttl/min_ttl/max_ttl` feed `placement.compute_ttl` when `store` carries metadata.
    """

    chunk_size: int = 256
    model_name: str = "model"
    world_size: int = 1
    worker_id: int = 0
    local_cpu_size: int | str = "1G"
    pool_name: str | None = None
    local_disk: str | None = None
    local_disk_size: int | str = "4G"
    remote_url: str | None = dataclasses.field(default=None, repr=False)  # may carry a password
    remote_serde: str = "none"
    remote_size: int | str | None = None
    cache_policy: str = "lru"
    write_policy: str = "write_through"
    save_unfull_chunk: bool = False
    pin_timeout_s: float = 300.0
    instance_id: str | None = None
    data_dir: str | None = None
    kv_dtype: str = "auto"
    tags: tuple[str, ...] = ()
    disk_writers: int = 4
    disk_queue: int = 8
    base_ttl: float = 3600.0
    min_ttl: float = 30.0
    max_ttl: float = 604800.0

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in _SIZES:
            value = getattr(self, name)
            if value is not None:
                fix(name, parse_size(value))
        if isinstance(self.tags, str):
            fix("tags", tuple(t for t in self.tags.split(",") if t))
        else:
            fix("tags", tuple(str(t) for t in self.tags))
        for name in ("chunk_size", "world_size", "disk_writers", "disk_queue"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise BadInputError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.worker_id, int) or not 0 <= self.worker_id < self.world_size:
            raise BadInputError(f"worker_id must be in [0, world_size={self.world_size}), got {self.worker_id!r}")
        if not self.model_name or "@" in self.model_name:
            raise BadInputError(f"model_name must be non-empty and without '@', got {self.model_name!r}")
        if self.local_cpu_size < 4096:  # type: ignore[operator]
            raise BadInputError(f"local_cpu_size must be at least 4K, got {self.local_cpu_size}")
        fix("cache_policy", str(self.cache_policy).lower())
        if self.cache_policy not in POLICIES:
            raise BadInputError(f"unknown cache_policy {self.cache_policy!r} (expected one of: {', '.join(POLICIES)})")
        if self.write_policy not in WRITE_POLICIES:
            raise BadInputError(f"unknown write_policy {self.write_policy!r} (expected {' or '.join(WRITE_POLICIES)})")
        if self.remote_serde == "naive":  # LMCache's name for no compression
            fix("remote_serde", "none")
        if self.remote_serde not in SERDES:
            raise BadInputError(f"unknown remote_serde {self.remote_serde!r} (expected none or zstd)")
        if self.kv_dtype not in KV_DTYPES:
            raise BadInputError(f"unknown kv_dtype {self.kv_dtype!r} (expected one of: {', '.join(KV_DTYPES)})")
        if self.remote_url is not None:
            scheme = str(self.remote_url).split("://", 1)[0].lower() if "://" in str(self.remote_url) else ""
            if scheme not in REMOTE_SCHEMES:
                raise BadInputError(
                    f"unsupported remote_url scheme in {self.remote_url!r} (expected redis://, rediss://, unix:// "
                    "or redis-cluster://HOST:PORT[,HOST:PORT...])"
                )
        if self.pin_timeout_s <= 0:
            raise BadInputError(f"pin_timeout_s must be positive, got {self.pin_timeout_s!r}")
        if not 0 <= self.min_ttl <= self.max_ttl:
            raise BadInputError(f"need 0 <= min_ttl <= max_ttl, got {self.min_ttl}, {self.max_ttl}")

    @property
    def default_instance_id(self) -> str:
        return self.instance_id or f"{self.model_name}@{self.world_size}@{self.worker_id}"

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able dict; the password of a remote URL is masked."""
        out = dataclasses.asdict(self)
        out["tags"] = list(self.tags)
        if self.remote_url:
            out["remote_url"] = _mask_url(self.remote_url)
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> "EngineConfig":
        """From a dict of field names (unknown names are an error, naming them)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise BadInputError(f"{source}: unknown engine setting(s) {', '.join(unknown)}")
        return cls(**{k: _coerce(k, v) for k, v in values.items()})

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "EngineConfig":
        """From a YAML mapping of field names (LMCache-style config file)."""
        import yaml

        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text())
        except FileNotFoundError:
            raise BadInputError(f"engine config {p} does not exist") from None
        except (IsADirectoryError, UnicodeDecodeError) as exc:
            raise BadInputError(f"engine config {p} is not a readable YAML file: {exc}") from None
        except yaml.YAMLError as exc:
            raise BadInputError(f"engine config {p} is not valid YAML: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise BadInputError(f"engine config {p} must be a mapping of settings")
        return cls.from_mapping(data, str(p))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "EngineConfig":
        """From INFERCACHE_KV_<FIELD> variables (e.g. INFERCACHE_KV_CHUNK_SIZE=256); `overrides` win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = raw
        values.update(overrides)
        return cls.from_mapping(values, "environment")


def _coerce(name: str, value: Any) -> Any:
    """Strings from env/YAML into the field's type."""
    if not isinstance(value, str):
        if name == "tags" and isinstance(value, list):
            return tuple(value)
        return value
    ints = ("chunk_size", "world_size", "worker_id", "disk_writers", "disk_queue")
    floats = ("pin_timeout_s", "base_ttl", "min_ttl", "max_ttl")
    try:
        if name in ints:
            return int(value)
        if name in floats:
            return float(value)
    except ValueError:
        raise BadInputError(f"{name} must be a number, got {value!r}") from None
    if name == "save_unfull_chunk":
        lowered = value.strip().lower()
        if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise BadInputError(f"save_unfull_chunk must be true or false, got {value!r}")
        return lowered in ("1", "true", "yes", "on")
    if name in ("remote_url", "local_disk", "pool_name", "instance_id", "data_dir", "remote_size") and value in ("", "none", "None"):
        return None
    return value


def _mask_url(url: str) -> str:
    """The URL with any password (user info, or redis-py's ``?password=``) replaced by ***, for logs and JSON."""
    url = re.sub(r"([?&]password=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    cred, _, host = rest.rpartition("@")
    user = cred.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}" if ":" in cred else f"{scheme}{sep}***@{host}"

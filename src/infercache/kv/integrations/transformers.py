"""Prefix reuse inside Hugging Face transformers generation (transformers 5.x, `DynamicCache`).

`ManagedGenerator.generate(prompt)` asks the engine how much of the prompt's KV is cached, loads
those chunks into a `DynamicCache`, lets the model compute only the uncached suffix, generates, and
stores the prompt's new chunks with the caller's placement metadata. Output equals recomputing
(the tests hold logits to 1e-4 in fp32 and greedy tokens exactly). If the engine is missing or
fails, generation goes on without reuse and a warning is logged (the seed's graceful degradation).

KV layout exchanged with the engine: `[2, num_layers, num_tokens, hidden]` with
`hidden = num_kv_heads * head_dim` (a `DynamicLayer` holds keys/values as
`[batch=1, num_kv_heads, num_tokens, head_dim]`). Only full-attention models are supported:
sliding-window, chunked, linear-attention and hybrid caches keep a different state per layer,
and feeding them a plain prefix would give wrong output, so they are refused by name.
"""

from __future__ import annotations

import hashlib
import logging
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from infercache.errors import BadInputError, InfercacheError
from infercache.kv.placement import AccessLog, compute_ttl, normalize_location, select_backend

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SUPPORTED_LAYER_TYPES = ("full_attention",)


class UnsupportedModelError(BadInputError):
    """The model's KV cache is not a plain full-attention DynamicCache; reuse would be wrong."""


@dataclass(frozen=True)
class KVShape:
    """How one model lays out its KV: the engine's hidden size is num_kv_heads * head_dim."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def hidden(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class GenerationResult:
    """One managed generation. `raw` is transformers' own generate output (logits when asked for)."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    tokens_reused: int
    tokens_computed: int
    ttft_s: float
    tier: str | None
    ttl: float | None
    tokens_stored: int = 0
    reuse_error: str | None = None
    raw: Any = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("raw", None)
        return data


def check_supported(model: Any) -> KVShape:
    """The model's KV shape, or UnsupportedModelError naming the cache layer types it cannot handle."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{config.model_type}: encoder-decoder models are not supported (decoder-only)")
    text_config = config.get_text_config(decoder=True)
    layer_types = _layer_types(text_config)
    unsupported = sorted({t for t in layer_types if t not in SUPPORTED_LAYER_TYPES})
    if unsupported:
        kinds = sorted(set(layer_types))
        what = f"hybrid cache (layers mix {', '.join(kinds)})" if len(kinds) > 1 else f"{kinds[0]} cache"
        raise UnsupportedModelError(
            f"{type(model).__name__} ({text_config.model_type}) has a {what}: sliding-window, chunked, "
            "linear-attention and hybrid caches are not supported; only full-attention DynamicCache models "
            "can reuse stored prefixes"
        )
    heads = int(getattr(text_config, "num_attention_heads"))
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    head_dim = getattr(text_config, "head_dim", None) or int(text_config.hidden_size) // heads
    return KVShape(num_layers=len(layer_types), num_kv_heads=kv_heads, head_dim=int(head_dim))


def _layer_types(text_config: Any) -> list[str]:
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        layer_types, _ = get_layer_types_and_kwargs(text_config)
        return list(layer_types)
    except (ImportError, AttributeError):  # a config without per-layer info: read the plain fields
        n = int(text_config.num_hidden_layers)
        if getattr(text_config, "layer_types", None):
            return list(text_config.layer_types)
        if getattr(text_config, "sliding_window", None) is not None:
            return ["sliding_attention"] * n
        return ["full_attention"] * n


def cache_to_kv(cache: Any, num_tokens: int | None = None) -> "torch.Tensor":
    """A DynamicCache (batch 1) as one `[2, num_layers, num_tokens, hidden]` tensor (a copy)."""
    import torch

    keys, values = [], []
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        if k is None or k.dim() != 4 or k.shape[0] != 1:
            raise UnsupportedModelError(f"cache layer {type(layer).__name__} holds no [1, heads, tokens, dim] keys")
        n = k.shape[2] if num_tokens is None else num_tokens
        keys.append(k[0, :, :n, :].transpose(0, 1).reshape(n, -1))
        values.append(v[0, :, :n, :].transpose(0, 1).reshape(n, -1))
    return torch.stack([torch.stack(keys), torch.stack(values)])


def kv_to_cache(kv: "torch.Tensor", shape: KVShape, config: Any = None) -> Any:
    """A DynamicCache holding `kv` ([2, num_layers, num_tokens, hidden]) for a model of `shape`."""
    from transformers import DynamicCache

    if kv.dim() != 4 or kv.shape[0] != 2 or kv.shape[1] != shape.num_layers or kv.shape[3] != shape.hidden:
        raise ValueError(
            f"stored KV has shape {tuple(kv.shape)}, the model needs "
            f"[2, {shape.num_layers}, tokens, {shape.hidden}] (another model under the same name?)"
        )
    n = kv.shape[2]
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    for layer_idx in range(shape.num_layers):
        k = kv[0, layer_idx].reshape(n, shape.num_kv_heads, shape.head_dim).transpose(0, 1).unsqueeze(0)
        v = kv[1, layer_idx].reshape(n, shape.num_kv_heads, shape.head_dim).transpose(0, 1).unsqueeze(0)
        cache.update(k.contiguous(), v.contiguous(), layer_idx)
    return cache


class _FirstTokenClock:
    """A streamer that notes when generate hands over its first new token (the prompt comes first)."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2 and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


class ManagedGenerator:
    """A transformers causal LM whose prompt prefixes are served from a KV engine when cached.

    `engine` is an infercache Engine (or None: plain generation). The generator never lets an
    engine failure stop generation: it logs a warning and recomputes.
    """

    def __init__(self, model: Any, tokenizer: Any, engine: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine
        self.shape = check_supported(model)
        self._seen = AccessLog()  # per prompt (its token ids)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Prompt ids without special tokens (the controller's /tokenize gives the same ids)."""
        if isinstance(prompt, str):
            ids = [int(i) for i in self.tokenizer.encode(prompt, add_special_tokens=False)]
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise BadInputError("the prompt is empty (no tokens)")
        return ids

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 32,
        metadata: dict[str, Any] | None = None,
        **generate_kwargs: Any,
    ) -> GenerationResult:
        """Generate from `prompt`, reusing its cached prefix; store the prompt's new full chunks."""
        import torch

        ids = self.encode(prompt)
        metadata = self._with_access(ids, metadata)
        device = _model_device(self.model)
        # Beam search and several sequences per prompt expand the batch (and refuse streamers):
        # they run without reuse, and their batch-wide cache is not stored.
        single = all(int(generate_kwargs.get(k) or 1) == 1 for k in ("num_beams", "num_return_sequences"))
        started = time.perf_counter()
        reused, cache, error = self._load_prefix(ids, device) if single else (0, None, None)
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        clock = _FirstTokenClock(generate_kwargs.pop("streamer", None))
        if single:
            generate_kwargs["streamer"] = clock
        elif clock.inner is not None:
            generate_kwargs["streamer"] = clock.inner
        generate_kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
        if getattr(self.model.generation_config, "pad_token_id", None) is None:
            generate_kwargs.setdefault("pad_token_id", self.model.generation_config.eos_token_id)
        with torch.no_grad():
            out = self.model.generate(
                input_ids,
                cache=cache,
                max_new_tokens=max_new_tokens,
                return_dict_in_generate=True,
                use_cache=True,
                **generate_kwargs,
            )
        finished = time.perf_counter()
        ttft = (clock.first_token_at or finished) - started
        new_ids = [int(t) for t in out.sequences[0, len(ids) :].tolist()]
        stored, store_error = self._store(ids, out, reused, metadata) if single else (0, None)
        tier, ttl = self._placement(ids, metadata)
        return GenerationResult(
            text=str(self.tokenizer.decode(new_ids, skip_special_tokens=True)),
            token_ids=new_ids,
            prompt_ids=ids,
            tokens_reused=reused,
            tokens_computed=len(ids) - reused,
            ttft_s=ttft,
            tier=tier,
            ttl=ttl,
            tokens_stored=stored,
            reuse_error=error or store_error,
            raw=out,
        )

    def _load_prefix(self, ids: list[int], device: Any) -> tuple[int, Any, str | None]:
        """(tokens reused, DynamicCache or None, error text); at least one prompt token is left to compute."""
        if self.engine is None:
            return 0, None, None
        try:
            cached = int(self.engine.lookup(ids))
            if cached <= 0:
                return 0, None, None
            mask, kv = self.engine.retrieve(ids[:cached])
            n = int(kv.shape[2]) if kv is not None else 0
            n = min(n, len(ids) - 1)  # the model must see at least one token to produce logits
            if n <= 0:
                return 0, None, None
            kv = _as_tensor(kv)[:, :, :n].to(device=device, dtype=self.model.dtype)
            return n, kv_to_cache(kv, self.shape, self.model.config), None
        except Exception as exc:  # graceful degradation: any engine failure means "no reuse"
            log.warning("KV engine failed on lookup/retrieve (%s: %s); generating without reuse",
                        type(exc).__name__, exc)
            return 0, None, f"{type(exc).__name__}: {exc}"

    def _store(self, ids: list[int], out: Any, reused: int, metadata: dict[str, Any] | None) -> tuple[int, str | None]:
        if self.engine is None:
            return 0, None
        try:
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            if cache is None:
                raise InfercacheError("generate returned no cache (use_cache disabled?)")
            kv = cache_to_kv(cache, len(ids)).to("cpu").contiguous()
            return int(self.engine.store(ids, kv, metadata=metadata)), None
        except Exception as exc:
            log.warning("KV engine failed to store the prompt's KV (%s: %s); nothing cached", type(exc).__name__, exc)
            return 0, f"{type(exc).__name__}: {exc}"

    def _with_access(self, ids: list[int], metadata: dict[str, Any] | None) -> dict[str, Any] | None:
        """The caller's metadata plus this prompt's access count and last access (unless given)."""
        if metadata is None:
            return None
        if not isinstance(metadata, dict):
            raise BadInputError(f"metadata must be a dict, got {type(metadata).__name__}")
        compute_ttl(metadata), select_backend(metadata)  # bad values fail here, before any work
        key = hashlib.blake2b(array("q", ids).tobytes(), digest_size=16).digest()
        return self._seen.annotate(key, metadata)[1]

    def _placement(self, ids: list[int], metadata: dict[str, Any] | None) -> tuple[str | None, float | None]:
        """Where the prompt's chunks sit now and the TTL the heuristics give them (the engine's bounds)."""
        meta = dict(metadata or {})
        cfg = getattr(self.engine, "config", None)
        bounds = {k: getattr(cfg, k) for k in ("base_ttl", "min_ttl", "max_ttl") if hasattr(cfg, k)}
        ttl = float(compute_ttl(meta, **bounds)) if metadata is not None else None
        tier: str | None = None
        if self.engine is not None:
            try:
                places = self.engine.locate(ids)
                if places:
                    tier = Counter(places).most_common(1)[0][0]
            except Exception as exc:
                log.warning("KV engine failed to locate the prompt (%s: %s)", type(exc).__name__, exc)
        if tier is None and metadata is not None:
            tier = normalize_location(select_backend(meta))
        return tier, ttl


def _model_device(model: Any) -> Any:
    device = getattr(model, "device", None)
    if device is None:
        device = next(model.parameters()).device
    return device


def _as_tensor(kv: Any) -> "torch.Tensor":
    import torch

    return kv if isinstance(kv, torch.Tensor) else torch.from_numpy(kv)

"""`MultiTierCache`: the seed's orchestrator loop, over either controller.

After each generation it tokenizes the prompt, asks the controller where the prompt's KV lives,
computes the TTL and the tier the placement heuristics want, and moves the KV when the tier
differs. The heuristics get an access count and last access time per prompt, tracked here, so a
prompt seen again earns a longer TTL (the seed's "access_count increments"). Controller failures
never stop generation: the text is returned and the failure is logged and recorded.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from infercache.errors import BadInputError
from infercache.kv.integrations.transformers import ManagedGenerator
from infercache.kv.placement import AccessLog, compute_ttl, normalize_location, select_backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManageRecord:
    """What one generate_and_manage call saw and decided."""

    prompt_tokens: int
    tokens_reused: int | None
    ttft_s: float | None
    location: str | None  # where the prompt's KV was after generation (None: not cached)
    tier: str  # where the heuristics want it
    ttl: float
    access_count: int
    moved: bool
    event_id: str | None
    move_status: str | None
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class MultiTierCache:
    """Generate, then place the prompt's KV by the TTL heuristics (seed 004's MultiTierCache).

    `controller`: a `ControllerClient` or `LocalController`. `llm`: a `ManagedGenerator`, a
    `(model, tokenizer)` pair (wrapped in a ManagedGenerator over a LocalController's engine, or
    with no engine for a remote controller), or any object with `generate(prompt, ...)`.
    `wait_moves=True` waits for each move to finish (the record then holds its final status).
    """

    def __init__(self, controller: Any, llm: Any = None, wait_moves: bool = False, move_timeout: float = 60.0) -> None:
        self.controller = controller
        self.llm: Any = None
        self.wait_moves = wait_moves
        self.move_timeout = move_timeout
        self.history: deque[ManageRecord] = deque(maxlen=1000)
        self._seen = AccessLog()  # per prompt text
        self._locations: tuple[str, ...] | None = None
        if llm is not None:
            self.set_llm(llm)

    @property
    def last(self) -> ManageRecord | None:
        return self.history[-1] if self.history else None

    def set_llm(self, llm: Any) -> None:
        """Attach the model (see the class doc for what `llm` may be)."""
        if isinstance(llm, tuple) and len(llm) == 2:
            llm = ManagedGenerator(llm[0], llm[1], getattr(self.controller, "engine", None))
        if not hasattr(llm, "generate"):
            raise BadInputError(f"llm must have a generate() method, got {type(llm).__name__}")
        self.llm = llm

    def generate_and_manage(
        self, prompt: str, sampling_params: Any = None, metadata: dict[str, Any] | None = None
    ) -> str:
        """Generate from `prompt`, then move its KV to the tier the heuristics pick; returns the text."""
        if self.llm is None:
            raise BadInputError("no model attached: pass llm= or call set_llm() first")
        meta = dict(metadata or {})
        text, prompt_ids, reused, ttft = self._generate(prompt, sampling_params, meta)
        error: str | None = None
        location = event_id = status = None
        moved = False
        tokens = prompt_ids
        count, meta = self._count_access(prompt, meta)
        ttl = compute_ttl(meta)
        tier = normalize_location(select_backend(meta))
        try:
            if tokens is None:
                tokens = self.controller.tokenize(prompt)
            layout = self.controller.lookup(tokens)
            if layout.get("found"):
                location = next(iter(layout.get("layout_info", {}).values()))[0]
            if location is not None and location != tier:
                if tier in self._controller_locations():
                    inst = self.controller.instance_id
                    event = self.controller.move([inst, location], [inst, tier], tokens)
                    event_id, moved = event["event_id"], True
                    status = "pending"
                    if self.wait_moves:
                        status = self.controller.wait(event_id, timeout=self.move_timeout).get("status")
                    log.info("moved KV of %d tokens from %s to %s (TTL %.0f s)", len(tokens), location, tier, ttl)
                else:
                    log.info("heuristics pick %s for this prompt, but the controller has no %s tier; KV stays in %s",
                             tier, tier, location)
            else:
                log.info("KV in %s, TTL %.0f s", location or "no tier (not cached)", ttl)
        except Exception as exc:  # graceful degradation: the text is what the caller asked for
            error = f"{type(exc).__name__}: {exc}"
            log.warning("KV placement skipped: %s", error)
        self.history.append(ManageRecord(
            prompt_tokens=len(tokens) if tokens is not None else 0, tokens_reused=reused, ttft_s=ttft,
            location=location, tier=tier, ttl=ttl, access_count=count, moved=moved, event_id=event_id,
            move_status=status, error=error,
        ))  # fmt: skip
        return text

    def _generate(
        self, prompt: str, sampling_params: Any, meta: dict[str, Any]
    ) -> tuple[str, list[int] | None, int | None, float | None]:
        if isinstance(self.llm, ManagedGenerator):
            r = self.llm.generate(prompt, metadata=meta or None, **_generate_kwargs(sampling_params))
            return r.text, r.prompt_ids, r.tokens_reused, r.ttft_s
        out = self.llm.generate(prompt, sampling_params) if sampling_params is not None else self.llm.generate(prompt)
        return _text_of(out), None, None, None

    def _count_access(self, prompt: str, meta: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Previous accesses of this prompt (fed to the heuristics unless the caller gave them)."""
        key = hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        return self._seen.annotate(key, meta)

    def _controller_locations(self) -> tuple[str, ...]:
        if self._locations is None:
            locations = getattr(self.controller, "locations", None)
            if locations is None:
                locations = self.controller.health().get("locations", ())
            self._locations = tuple(locations)
        return self._locations


def _generate_kwargs(sampling_params: Any) -> dict[str, Any]:
    """transformers generate kwargs from a dict, or from a vLLM-style SamplingParams object."""
    if sampling_params is None:
        return {}
    if isinstance(sampling_params, dict):
        return dict(sampling_params)
    kwargs: dict[str, Any] = {}
    if getattr(sampling_params, "max_tokens", None) is not None:
        kwargs["max_new_tokens"] = int(sampling_params.max_tokens)
    temperature = getattr(sampling_params, "temperature", None)
    if temperature is not None:
        kwargs["do_sample"] = temperature > 0
        if temperature > 0:
            kwargs["temperature"] = float(temperature)
    for name in ("top_p", "top_k"):
        value = getattr(sampling_params, name, None)
        if value is not None and kwargs.get("do_sample") and not (name == "top_k" and value < 1):
            kwargs[name] = value
    return kwargs


def _text_of(out: Any) -> str:
    """Text from a str, an object with .text, or vLLM's list of RequestOutput."""
    if isinstance(out, str):
        return out
    if hasattr(out, "text"):
        return str(out.text)
    if isinstance(out, (list, tuple)) and out:
        first = out[0]
        outputs = getattr(first, "outputs", None)
        if outputs:
            return str(outputs[0].text)
        return _text_of(first)
    return str(out)

"""MultiTierCache (the seed's loop) and LocalController over a real in-process Engine."""

from __future__ import annotations

import logging

import pytest

from tests.helpers import require_module

torch = require_module("torch")
require_module("transformers")

from infercache.kv.client import ControllerClient, LocalController, NotFoundError, TooLargeError  # noqa: E402
from infercache.kv.tiered import MultiTierCache  # noqa: E402
from infercache.kv.tokenizer import byte_level_tokenizer  # noqa: E402
from infercache.testing.models import random_llama  # noqa: E402

from tests.kv.serve.conftest import CHUNK  # noqa: E402
PREFIX = "System: you answer questions about the infercache manual, briefly. " * 2  # 136 tokens




@pytest.fixture(scope="module")
def model_and_tokenizer():
    return random_llama(), byte_level_tokenizer()


def test_generate_and_manage_keeps_easy_prompts_hot_and_moves_hard_ones(engine, model_and_tokenizer):
    controller = LocalController(engine, tokenizer=model_and_tokenizer[1])
    cache = MultiTierCache(controller, wait_moves=True)
    cache.set_llm(model_and_tokenizer)  # a (model, tokenizer) pair: wrapped over the controller's engine
    easy = {"perplexity": 15.0, "time_variance": 0.05}

    text = cache.generate_and_manage(PREFIX + "Q1?", {"max_new_tokens": 4}, easy)
    first = cache.last
    assert isinstance(text, str) and len(text) > 0
    assert (first.location, first.tier, first.moved, first.tokens_reused) == ("hot", "hot", False, 0)
    assert first.ttl == pytest.approx(3600 * 1.08 * 0.95)  # the seed's example: ~3694 s

    cache.generate_and_manage(PREFIX + "Q2?", {"max_new_tokens": 4}, easy)
    assert cache.last.tokens_reused == 128  # the shared prefix came from the cache
    cache.generate_and_manage(PREFIX + "Q1?", {"max_new_tokens": 4}, easy)
    assert cache.last.access_count == 2 and cache.last.ttl > first.ttl  # seen again: longer TTL

    # The same prompt turns out hard: the heuristics want disk; its chunks are hot, so they move.
    cache.generate_and_manage(PREFIX + "Q1?", {"max_new_tokens": 4}, {"perplexity": 35.0})
    hard = cache.last
    assert (hard.location, hard.tier, hard.moved, hard.move_status) == ("hot", "disk", True, "finished")
    ids = byte_level_tokenizer().encode(PREFIX + "Q1?", add_special_tokens=False)
    assert set(engine.locate(ids)) == {"disk"}
    # Remote is not configured here: a very hard prompt stays where it is, with no error.
    cache.generate_and_manage(PREFIX + "Q3?", {"max_new_tokens": 2}, {"perplexity": 90.0})
    assert cache.last.tier == "remote" and cache.last.moved is False and cache.last.error is None
    assert [r.to_json()["tier"] for r in cache.history] == ["hot", "hot", "hot", "disk", "remote"]


def test_controller_failure_still_returns_the_text(model_and_tokenizer, caplog):
    cache = MultiTierCache(ControllerClient(port=1), llm=model_and_tokenizer)  # nothing listens there
    with caplog.at_level(logging.WARNING):
        text = cache.generate_and_manage("hello there, general", {"max_new_tokens": 3})
    assert isinstance(text, str) and len(text) > 0
    assert "cannot reach" in cache.last.error
    assert any("placement skipped" in r.getMessage() for r in caplog.records)


def test_any_llm_with_generate_and_vllm_style_outputs(engine):
    class Output:
        def __init__(self, text):
            self.outputs = [type("Completion", (), {"text": text})()]

    class FakeVllm:
        """A stand-in for vLLM's LLM (not installable here): generate() returns RequestOutputs."""

        def generate(self, prompt, sampling_params=None):
            return [Output(prompt.upper())]

    cache = MultiTierCache(LocalController(engine), FakeVllm())
    assert cache.generate_and_manage("abc") == "ABC"
    assert cache.last.location is None and cache.last.error is None  # nothing cached for it
    with pytest.raises(ValueError, match="generate"):
        cache.set_llm(object())
    with pytest.raises(ValueError, match="set_llm"):
        MultiTierCache(LocalController(engine)).generate_and_manage("x")


def test_local_controller_has_the_server_semantics(engine):
    import numpy as np

    ctl = LocalController(engine, max_tokens=100)
    tokens = list(range(3 * CHUNK))
    engine.store(tokens, np.zeros((2, 2, len(tokens), 8), dtype=np.float32))
    assert ctl.lookup(tokens) == {"found": True, "matched_tokens": 48, "layout_info": {engine.instance_id: ["hot", 48]}}
    event = ctl.move("hot", "disk", tokens)  # bare locations mean this instance
    assert ctl.wait(event["event_id"]) == {"status": "finished", "num_tokens": 48}
    assert ctl.pending_moves() == 0 and ctl.health()["pending_moves"] == 0
    assert ctl.lookup(tokens)["layout_info"][engine.instance_id] == ["disk", 48]
    with pytest.raises(NotFoundError):
        ctl.move("hot", "remote", tokens)
    with pytest.raises(TooLargeError):
        ctl.lookup(list(range(101)))
    summary = ctl.close()
    assert summary == {"finished": 0, "failed": 0}
    with pytest.raises(Exception, match="shutting down"):
        ctl.move("disk", "hot", tokens)

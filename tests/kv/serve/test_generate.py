"""Reuse inside generation: ManagedGenerator over a real Engine (shared-memory pool + disk tier) with
GPT-2 and Llama-style (rotary, GQA) models built here with random weights (nothing downloaded).

The bar: first-token logits with reuse vs full recompute within 1e-4 (fp32), greedy tokens identical,
for shared prefixes that end on a chunk boundary and off it.
"""

from __future__ import annotations

import logging

import pytest

from tests.helpers import require_module

torch = require_module("torch")
require_module("transformers")

from infercache.kv.integrations.transformers import ManagedGenerator  # noqa: E402
from infercache.kv.tokenizer import byte_level_tokenizer  # noqa: E402
from infercache.testing.models import random_gpt2, random_llama  # noqa: E402

from tests.kv.serve.conftest import CHUNK  # noqa: E402
MODELS = {"llama-gqa": random_llama, "gpt2": random_gpt2}




@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def _run(gen, prompt, **kw):
    return gen.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True, **kw)


def _same(reused, plain):
    diff = (reused.raw.logits[0] - plain.raw.logits[0]).abs().max().item()
    assert diff <= 1e-4, diff
    assert reused.token_ids == plain.token_ids
    assert reused.text == plain.text


@pytest.mark.parametrize("kind", list(MODELS))
def test_reuse_matches_recompute_on_and_off_chunk_boundaries(kind, engine, tokenizer):
    model = MODELS[kind]()
    gen, plain = ManagedGenerator(model, tokenizer, engine), ManagedGenerator(model, tokenizer, None)
    on = "A" * 7 + "shared prefix, 32 bytes long!!"[:25]  # 32 tokens: exactly two chunks
    off = on + "and 8 more"[:8]  # 40 tokens: two chunks and a half
    assert len(tokenizer.encode(on, add_special_tokens=False)) == 32

    first = _run(gen, off + " first question?")
    assert (first.tokens_reused, first.tokens_stored) == (0, 48)  # 56 tokens: three full chunks stored
    _same(first, _run(plain, off + " first question?"))

    cases = [
        (on + " a different tail", 32),  # the shared prefix ends on a chunk boundary
        (off + " another tail here", 32),  # shared prefix ends mid-chunk: its last partial chunk is recomputed
        ((off + " first question?")[:48], 47),  # a fully cached prompt: all but its last token reused
    ]
    for prompt, reused in cases:
        r = _run(gen, prompt)
        assert r.tokens_reused == reused, prompt
        assert r.tokens_computed == len(r.prompt_ids) - reused
        assert r.ttft_s > 0
        _same(r, _run(plain, prompt))


def test_placement_metadata_sets_tier_and_ttl(engine, tokenizer):
    gen = ManagedGenerator(random_llama(), tokenizer, engine)
    easy = gen.generate("an easy prompt that repeats " * 2, max_new_tokens=2, metadata={"perplexity": 15, "time_variance": 0.05})
    assert easy.tier == "hot"
    assert easy.ttl == pytest.approx(3600 * (1 + 15 / 187.5) * 0.95)  # the seed's worked example, ~3694 s
    again = gen.generate("an easy prompt that repeats " * 2, max_new_tokens=2, metadata={"perplexity": 15, "time_variance": 0.05})
    assert again.ttl > easy.ttl  # a second access earns a longer TTL
    hard = gen.generate("a hard prompt, rarely seen again " * 2, max_new_tokens=2, metadata={"perplexity": 30})
    assert hard.tier == "disk"
    assert engine.locate(hard.prompt_ids) == ["disk"] * (len(hard.prompt_ids) // CHUNK)
    assert hard.to_json()["tier"] == "disk" and "raw" not in hard.to_json()
    with pytest.raises(ValueError, match="perplexity"):
        gen.generate("x" * 20, metadata={"perplexity": "high"})


def test_failing_engine_degrades_to_plain_generation_with_a_warning(engine, tokenizer, caplog):
    model = random_llama()
    gen, plain = ManagedGenerator(model, tokenizer, engine), ManagedGenerator(model, tokenizer, None)
    prompt = "the engine goes away after this prompt " * 2
    gen.generate(prompt, max_new_tokens=2)
    engine.close()  # every engine call now raises
    with caplog.at_level(logging.WARNING):
        r = _run(gen, prompt + "!")
    assert r.tokens_reused == 0 and r.tokens_stored == 0
    assert "closed" in (r.reuse_error or "")
    assert any("generating without reuse" in rec.getMessage() for rec in caplog.records)
    _same(r, _run(plain, prompt + "!"))


def test_a_different_model_under_the_same_name_is_not_loaded(engine, tokenizer, caplog):
    """KV of another geometry (same engine, same tokens) is refused, not fed to the model."""
    prompt = "same tokens, other model " * 2
    ManagedGenerator(random_llama(hidden=64, kv_heads=2), tokenizer, engine).generate(prompt, max_new_tokens=1)
    other = ManagedGenerator(random_llama(hidden=64, kv_heads=4), tokenizer, engine)
    with caplog.at_level(logging.WARNING):
        r = other.generate(prompt, max_new_tokens=2)
    assert r.tokens_reused == 0 and "another model" in (r.reuse_error or "")


def test_token_id_prompts_and_empty_prompts(engine, tokenizer):
    gen = ManagedGenerator(random_gpt2(), tokenizer, engine)
    ids = list(range(40, 80))
    assert gen.generate(ids, max_new_tokens=1).prompt_ids == ids
    assert gen.generate(ids + [1], max_new_tokens=1).tokens_reused == 32
    with pytest.raises(ValueError, match="empty"):
        gen.generate("")


def test_beam_search_runs_without_reuse(engine, tokenizer):
    model = random_llama()
    gen, plain = ManagedGenerator(model, tokenizer, engine), ManagedGenerator(model, tokenizer, None)
    prompt = "beams expand the batch, so no reuse here " * 2
    gen.generate(prompt, max_new_tokens=1)  # cached now
    beams = gen.generate(prompt, max_new_tokens=4, num_beams=2, do_sample=False)
    assert beams.tokens_reused == 0 and beams.tokens_stored == 0
    assert beams.token_ids == plain.generate(prompt, max_new_tokens=4, num_beams=2, do_sample=False).token_ids

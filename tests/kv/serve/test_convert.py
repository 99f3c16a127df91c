"""DynamicCache <-> engine layout ([2, layers, tokens, kv_heads*head_dim]) and the refusal of other caches.

Real transformers models with small random configs (nothing downloaded).
"""

from __future__ import annotations

import pytest

from tests.helpers import require_module

torch = require_module("torch")
require_module("transformers")

from infercache.kv.integrations.transformers import (  # noqa: E402
    UnsupportedModelError,
    cache_to_kv,
    check_supported,
    kv_to_cache,
)
from infercache.testing.models import random_gpt2, random_llama  # noqa: E402


def _generate(model, ids, cache=None):
    return model.generate(
        ids, cache=cache, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip


@pytest.mark.parametrize("make", [random_llama, random_gpt2], ids=["llama-gqa", "gpt2"])
def test_layout_round_trip_gives_the_same_generation(make):
    model = make()
    shape = check_supported(model)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    full = _generate(model, ids)
    kv = cache_to_kv(full.cache, 40)
    assert tuple(kv.shape) == (2, shape.num_layers, 40, shape.hidden)
    # The layout is [key|value, layer, token, head-major hidden]: check one element against the cache.
    layer = full.cache.layers[1]
    assert torch.equal(kv[1, 1, 7, shape.head_dim : 2 * shape.head_dim], layer.values[0, 1, 7])
    for n in (16, 21, 39):  # on a chunk boundary, off it, all but the last token
        part = _generate(model, ids, cache=kv_to_cache(kv[:, :, :n].clone(), shape, model.config))
        assert (full.logits[0] - part.logits[0]).abs().max().item() <= 1e-4
        assert torch.equal(full.sequences, part.sequences)


def test_gqa_shape_is_kv_heads_times_head_dim():
    shape = check_supported(random_llama(hidden=64, heads=4, kv_heads=2))
    assert (shape.num_kv_heads, shape.head_dim, shape.hidden) == (2, 16, 32)


def test_wrong_shape_is_refused_not_loaded():
    model = random_llama()
    shape = check_supported(model)
    with pytest.raises(ValueError, match="another model"):
        kv_to_cache(torch.zeros(2, shape.num_layers, 4, shape.hidden + 1), shape, model.config)


def _config(kind):
    from transformers import MistralConfig, Qwen2Config

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    if kind == "sliding":
        return MistralConfig(sliding_window=16, **common)
    return Qwen2Config(use_sliding_window=True, sliding_window=16, max_window_layers=1, **common)


@pytest.mark.parametrize("kind,expect", [("sliding", "sliding_attention cache"), ("hybrid", "hybrid cache")])
def test_sliding_and_hybrid_caches_are_refused_by_name(kind, expect):
    from transformers import AutoModelForCausalLM

    from infercache.kv.integrations.transformers import ManagedGenerator
    from infercache.kv.tokenizer import byte_level_tokenizer

    model = AutoModelForCausalLM.from_config(_config(kind))
    with pytest.raises(UnsupportedModelError, match=expect) as err:
        ManagedGenerator(model, byte_level_tokenizer(), None)
    assert "sliding_attention" in str(err.value)

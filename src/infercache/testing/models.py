"""Small random-initialised transformers models for the KV demo, tests and benches (nothing downloaded).

Vocabulary 256 so they pair with `infercache.kv.tokenizer.byte_level_tokenizer()` (id = UTF-8 byte),
which is also the controller's fallback tokenizer: model, generator and controller agree on ids.
"""

from __future__ import annotations

from typing import Any

VOCAB = 256


def random_llama(
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_positions: int = 4096,
    seed: int = 0,
    dtype: Any = None,
) -> Any:
    """A Llama-style causal LM (rotary positions, grouped-query attention), fp32 unless `dtype`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    if dtype is not None:
        model = model.to(dtype)
    return model


def random_gpt2(hidden: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 1024, seed: int = 0) -> Any:
    """A GPT-2 causal LM (learned absolute positions, multi-head attention)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()

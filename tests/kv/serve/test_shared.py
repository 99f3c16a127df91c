"""Several processes, one KV cache: a generating process stores a prompt's chunks into the shared hot
pool, the `kv serve` process sees them, and a ManagedGenerator in this process reuses them with output
equal to recomputing; then MultiTierCache moves them through the server's HTTP API."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import require_module

torch = require_module("torch")
require_module("transformers")

from infercache.kv.client import ControllerClient  # noqa: E402
from infercache.kv.integrations.transformers import ManagedGenerator  # noqa: E402
from infercache.kv.tiered import MultiTierCache  # noqa: E402
from infercache.kv.tokenizer import byte_level_tokenizer  # noqa: E402
from infercache.testing.models import random_llama  # noqa: E402
from tests.kv.serve.conftest import CHUNK, TOKEN  # noqa: E402

PROMPT = "You are a careful assistant. Answer briefly and cite the manual. " * 2  # 132 tokens


def _worker(config: dict, prompt: str) -> dict:
    cfg = {k: v for k, v in config.items() if k not in ("local_disk", "local_disk_size")}
    out = subprocess.run([sys.executable, "-m", "tests.kv.serve.genworker", json.dumps(cfg), prompt],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_prompt_stored_by_one_process_is_reused_by_another(server, shared_engine):
    stored = _worker(server.config, PROMPT)  # process 1: generates, stores 8 full chunks
    assert stored["tokens_reused"] == 0 and stored["tokens_stored"] == 8 * CHUNK
    ids = stored["prompt_ids"]
    with ControllerClient(server.url, token=TOKEN) as controller:  # process 2: the server sees them
        layout = controller.lookup(ids)
        assert layout == {"found": True, "matched_tokens": 128, "layout_info": {server.instance_id: ["hot", 128]}}

        model, tok = random_llama(), byte_level_tokenizer()  # process 3 (here): same weights
        gen = ManagedGenerator(model, tok, shared_engine())
        plain = ManagedGenerator(model, tok, None)
        reused = gen.generate(PROMPT + "Why?", max_new_tokens=6, do_sample=False, output_logits=True)
        recomputed = plain.generate(PROMPT + "Why?", max_new_tokens=6, do_sample=False, output_logits=True)
        assert reused.tokens_reused == 128
        assert (reused.raw.logits[0] - recomputed.raw.logits[0]).abs().max().item() <= 1e-4
        assert reused.token_ids == recomputed.token_ids
        # The stored process's own first-token logits equal this process's recompute of the same prompt.
        again = plain.generate(PROMPT, max_new_tokens=6, do_sample=False, output_logits=True)
        assert torch.allclose(torch.tensor(stored["first_logits"]), again.raw.logits[0][0], atol=1e-4)
        assert stored["token_ids"] == again.token_ids

        # MultiTierCache over the HTTP controller: a high-perplexity prompt belongs on disk; this
        # engine has no disk tier (stored hot), the server has one, so the server moves it there.
        cache = MultiTierCache(controller, gen, wait_moves=True)
        text = cache.generate_and_manage(PROMPT + "Why?", {"max_new_tokens": 3}, {"perplexity": 35.0})
        assert isinstance(text, str) and len(text) > 0
        rec = cache.last
        assert (rec.location, rec.tier, rec.moved, rec.move_status, rec.error) == ("hot", "disk", True, "finished", None)
        assert rec.tokens_reused == 128 and rec.prompt_tokens == len(ids) + 4
        assert controller.lookup(ids)["layout_info"] == {server.instance_id: ["disk", 128]}
        assert gen.generate(PROMPT + "Why?", max_new_tokens=1).tokens_reused == 0  # no longer in the shared pool

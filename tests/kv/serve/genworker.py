"""A generating process for the cross-process tests: `python -m tests.kv.serve.genworker CONFIG_JSON PROMPT`.

It attaches an Engine to the pool named in CONFIG_JSON (a separate interpreter, not a fork), runs
ManagedGenerator over the test's random Llama (same seed, same weights) and prints the result as JSON.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from infercache.kv.config import EngineConfig
    from infercache.kv.engine import Engine
    from infercache.kv.integrations.transformers import ManagedGenerator
    from infercache.kv.tokenizer import byte_level_tokenizer
    from infercache.testing.models import random_llama

    config, prompt = json.loads(sys.argv[1]), sys.argv[2]
    with Engine(EngineConfig(**config)) as engine:
        gen = ManagedGenerator(random_llama(), byte_level_tokenizer(), engine)
        r = gen.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True)
        out = r.to_json()
        out["first_logits"] = r.raw.logits[0][0].tolist()
    print(json.dumps(out))


if __name__ == "__main__":
    main()

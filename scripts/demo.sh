#!/usr/bin/env bash
# The main job on embedded defaults: a small real Triton cache compiled for four GPU targets
# (no GPU needed), indexed, listed, summarised and dry-run pruned; packed into an OCI image,
# inspected, checked and unpacked for one target (Triton hits there); a shared-memory KV pool.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
work=$(mktemp -d -t infercache-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
export INFERCACHE_DATA_DIR="$work/data" TRITON_DEFAULT_FP_FUSION=1
echo "== compiling sample kernels for cuda:80, cuda:90, hip:gfx90a, hip:gfx942 into $work/cache"
"$PY" -c "import sys; from infercache.testing.samples import build_sample_cache; print(len(build_sample_cache(sys.argv[1])), 'entries')" "$work/cache" 2>/dev/null
IC=("$PY" -m infercache.cli.app)
export COLUMNS=${COLUMNS:-120}
echo
echo "== infercache kernels index --cache-dir $work/cache"
"${IC[@]}" kernels index --cache-dir "$work/cache"
echo
echo "== infercache kernels list --sort size:desc --limit 8"
"${IC[@]}" kernels list --sort size:desc --limit 8
echo
echo "== infercache kernels list --backend rocm --name-like 'matmul*' --format json (first element)"
"${IC[@]}" kernels list --backend rocm --name-like 'matmul*' --format json \
    | "$PY" -c "import json, sys; rows = json.load(sys.stdin); print(json.dumps(rows[0], indent=2)); print(len(rows), 'rows')"
echo
echo "== infercache kernels stats"
"${IC[@]}" kernels stats
echo
echo "== infercache kernels prune --dry-run   (IR-only: kernels stay Triton cache hits)"
"${IC[@]}" kernels prune --dry-run
echo
echo "== infercache kernels prune --deduplicate --dry-run"
"${IC[@]}" kernels prune --deduplicate --dry-run
echo
echo "== infercache vault pack $work/cache oci:$work/image:demo --compression zstd"
"${IC[@]}" vault pack "$work/cache" "oci:$work/image:demo" --compression zstd
echo
echo "== infercache vault inspect oci:$work/image:demo   (manifest + config only)"
"${IC[@]}" vault inspect "oci:$work/image:demo"
echo
echo "== infercache vault check oci:$work/image:demo --target cuda:90 --target hip:gfx1100:32"
"${IC[@]}" vault check "oci:$work/image:demo" --target cuda:90 --target hip:gfx1100:32 || true
echo
echo "== infercache vault unpack oci:$work/image:demo --target cuda:90 --dest $work/node-cache"
"${IC[@]}" vault unpack "oci:$work/image:demo" --target cuda:90 --dest "$work/node-cache"
echo "== Triton at the new location: every unpacked cuda:90 kernel is a cache hit (no compile)"
"$PY" - "$work/node-cache" <<'PY' 2>/dev/null
import sys
from infercache.testing.samples import SAMPLE_KERNELS, compile_sample
hits = [compile_sample(sys.argv[1], k, "cuda:90", num_warps=w).cache_hit for k in SAMPLE_KERNELS for w in (4, 8)]
print(f"{sum(hits)} of {len(hits)} cuda:90 compiles were cache hits")
PY
echo
pool="demo-$$"
echo "== infercache kv create $pool --size 64M --policy s3fifo; a second process puts, the CLI reads"
"${IC[@]}" kv create "$pool" --size 64M --policy s3fifo
trap '"${IC[@]}" kv delete "$pool" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
"$PY" - "$pool" <<'PY'
import sys
import numpy as np
from infercache.kv import Pool
with Pool.open(sys.argv[1]) as pool:
    chunk = np.random.default_rng(0).standard_normal((2, 4, 256, 128)).astype(np.float16)  # [2, layers, tokens, hidden]
    for i in range(16):
        pool.put(f"model@chunk{i}", chunk, prefix="prompt-0")
    assert pool.get_array("model@chunk3", np.float16, chunk.shape).tobytes() == chunk.tobytes()
    print(f"put 16 chunks of {chunk.nbytes >> 10} KiB; read one back intact")
PY
"${IC[@]}" kv status "$pool"
"${IC[@]}" kv delete "$pool"
echo
echo "== KV reuse in generation: a random Llama-style model (rotary, GQA) and a byte-level tokenizer, built"
echo "   here (nothing downloaded); prompts sharing a long prefix go through MultiTierCache over an engine"
echo "   with a shared-memory hot tier and a disk tier; TTFT is measured with and without reuse"
kvname="demo-kv-$$"
trap '[ -n "${srv_pid:-}" ] && kill "$srv_pid" 2>/dev/null; "$PY" -c "import sys; from infercache.kv.pool import Pool; Pool.destroy(sys.argv[1])" "$kvname" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
"$PY" - "$kvname" "$work/kvdisk" <<'PY'
import sys
import torch
from infercache.kv import Engine
from infercache.kv.client import LocalController
from infercache.kv.integrations.transformers import ManagedGenerator
from infercache.kv.tiered import MultiTierCache
from infercache.kv.tokenizer import byte_level_tokenizer
from infercache.testing.models import random_llama

torch.set_num_threads(1)  # steadier timings on a shared machine
name, disk = sys.argv[1], sys.argv[2]
model, tok = random_llama(hidden=384, layers=4, heads=6, kv_heads=2, intermediate=1024), byte_level_tokenizer()
engine = Engine(chunk_size=64, model_name=name, pool_name=name, local_cpu_size="64M", local_disk=disk, local_disk_size="256M")
gen, plain = ManagedGenerator(model, tok, engine), ManagedGenerator(model, tok, None)
cache = MultiTierCache(LocalController(engine, tokenizer=tok), gen, wait_moves=True)
manual = "".join(f"Section {i}: the cache keeps KV chunks of 64 tokens; a chunk is useless without its prefix. " for i in range(16))
prompts = [
    ("What is a chunk?", {"perplexity": 12.0, "time_variance": 0.05}),
    ("Why keep prefixes?", {"perplexity": 15.0, "time_variance": 0.05}),
    ("Explain eviction in detail, with the maths.", {"perplexity": 35.0, "time_variance": 0.6}),
    ("What is a chunk?", {"perplexity": 12.0, "time_variance": 0.05}),
    ("Summarise section 3.", {"perplexity": 80.0, "time_variance": 0.2}),
]
print(f"shared prefix: {len(tok.encode(manual))} tokens; model: 4 layers, hidden 384, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params")
print(f"{'#':>2} {'prompt tokens':>13} {'reused':>7} {'TTFT reuse':>11} {'TTFT none':>10} {'was in':>7} {'tier':>6} {'TTL s':>7}  action")
for i, (question, meta) in enumerate(prompts, 1):
    prompt = manual + "Q: " + question + " A:"
    cold = plain.generate(prompt, max_new_tokens=8).ttft_s
    cache.generate_and_manage(prompt, {"max_new_tokens": 8}, meta)
    r = cache.last
    action = f"moved to {r.tier} ({r.move_status})" if r.moved else ("kept" if r.location == r.tier else f"no {r.tier} tier: stays {r.location}")
    print(f"{i:>2} {r.prompt_tokens:>13} {r.tokens_reused:>7} {r.ttft_s * 1e3:>9.0f}ms {cold * 1e3:>8.0f}ms {r.location or '-':>7} {r.tier:>6} {r.ttl:>7.0f}  {action}")
stats = engine.stats().to_json()["tiers"]
print("engine:", ", ".join(f"{t}: {s['hits']} hits, {s['misses']} misses, {s['bytes'] >> 10} KiB" for t, s in stats.items()))
engine.close()
PY
echo
echo "== infercache kv serve --port 0 on the same hot pool; the client asks where the prompt's KV lives, then SIGTERM"
printf 'chunk_size: 64\nmodel_name: %s\npool_name: %s\nlocal_cpu_size: 64M\n' "$kvname" "$kvname" > "$work/kv.yaml"
"${IC[@]}" kv serve --port 0 --config "$work/kv.yaml" > "$work/serve.log" 2>&1 &
srv_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/serve.log" 2>/dev/null && break; sleep 0.1; done
head -1 "$work/serve.log"
url=$(grep -o 'http://[0-9.:]*' "$work/serve.log" | head -1)
"$PY" - "$url" <<'PY'
import sys
from infercache.kv.client import ControllerClient
manual = "".join(f"Section {i}: the cache keeps KV chunks of 64 tokens; a chunk is useless without its prefix. " for i in range(16))
with ControllerClient(sys.argv[1]) as c:
    tokens = c.tokenize(manual + "Q: What is a chunk? A:")
    print(f"POST /tokenize -> {len(tokens)} tokens; POST /lookup -> {c.lookup(tokens)}")
    hits = [l for l in c.metrics().splitlines() if l.startswith(("infercache_kv_bytes", 'infercache_kv_requests_total'))]
    print("GET /metrics (excerpt):\n  " + "\n  ".join(hits[:4]))
PY
kill -TERM "$srv_pid"; wait "$srv_pid" || true; srv_pid=
tail -1 "$work/serve.log"

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

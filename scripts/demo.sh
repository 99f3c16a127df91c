#!/usr/bin/env bash
# The main job on embedded defaults: a small real Triton cache compiled for four GPU targets
# (no GPU needed), indexed, listed, summarised, and a dry-run prune.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
work=$(mktemp -d -t infercache-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
export INFERCACHE_DATA_DIR="$work/data" TRITON_DEFAULT_FP_FUSION=1
echo "== compiling sample kernels for cuda:80, cuda:90, hip:gfx90a, hip:gfx942 into $work/cache"
"$PY" -c "import sys; from infercache.kernels.samples import build_sample_cache; print(len(build_sample_cache(sys.argv[1])), 'entries')" "$work/cache" 2>/dev/null
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

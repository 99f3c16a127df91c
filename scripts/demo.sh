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

"""A stand-in for podman/docker (no container engine can run on the test machines).

`install(bin_dir, name)` writes an executable `name` that records its argv and the
token variables of its environment to $FAKE_ENGINE_LOG (JSON), then does what the
warm container would: writes a vLLM-shaped cache into the host side of its `-v`
mount, copying real Triton entries from $FAKE_ENGINE_SEED. Exits $FAKE_ENGINE_RC.
"""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPT = '''#!{python}
import json, os, shutil, sys
argv = sys.argv[1:]
env = {{k: os.environ[k] for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN") if k in os.environ}}
with open(os.environ["FAKE_ENGINE_LOG"], "w") as f:
    json.dump({{"engine": os.path.basename(sys.argv[0]), "argv": argv, "env": env}}, f)
rc = int(os.environ.get("FAKE_ENGINE_RC", "0"))
if rc == 0 and "-v" in argv:
    host = argv[argv.index("-v") + 1].split(":")[0]
    rank = os.path.join(host, "torch_compile_cache", "0123456789", "rank_0_0")
    seed = os.environ.get("FAKE_ENGINE_SEED")
    if seed:
        shutil.copytree(seed, os.path.join(rank, "triton_cache"))
    os.makedirs(os.path.join(rank, "backbone"), exist_ok=True)
    with open(os.path.join(rank, "backbone", "vllm_compile_cache.py"), "w") as f:
        f.write("{{}}\\n")
print("fake engine: ran", flush=True)
sys.exit(rc)
'''


def install(bin_dir: Path, name: str = "podman") -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(SCRIPT.format(python=sys.executable))
    path.chmod(0o755)
    return path

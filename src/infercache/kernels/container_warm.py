"""`kernels warm --model` / `mcm warm`: warm a vLLM cache by running the model in a container.

The container (a vLLM image that loads the model and runs a few generations) writes
its compile caches into a host directory mounted at the container's vLLM cache dir.
Real runs need podman or docker with GPU access: CUDA through the NVIDIA CDI device
(``--device nvidia.com/gpu=all``, podman) or ``--gpus all`` (docker); ROCm through
``/dev/kfd`` and ``/dev/dri`` with the ``video`` group, as MCM's tool does.

The Hugging Face token travels only in the engine's environment: the command line
says ``-e HF_TOKEN`` (no value), which podman and docker fill from their own
environment, so the token never appears in argv, in ``ps``, in the plan or in logs.

Afterwards the warm metadata (model, image, engine, times, the Triton entries found)
is written beside the cache as ``infercache-warm.json``, and with ``tarball`` the
cache is packed into exactly the ``output`` path (written atomically).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from infercache.errors import BadInputError, InfercacheError
from infercache.fsutil import atomic_file, atomic_write_json
from infercache.kernels.discovery import discover
from infercache.kernels.query import iso
from infercache.kernels.triton_entry import TritonEntry, parse_entry

logger = logging.getLogger(__name__)

CUDA_IMAGE = "quay.io/rh-ee-asangior/vllm-0.9.2-tcm-warm:0.0.2"
ROCM_IMAGE = "quay.io/rh-ee-asangior/vllm-0.9.1-tcm-warm-rocm:0.0.1"
DEFAULT_MODEL = "facebook/opt-125m"
DEFAULT_VLLM_CACHE_DIR = "/root/.cache/vllm/"
DEFAULT_OUTPUT = "warmed_cache.tar.gz"
METADATA_NAME = "infercache-warm.json"
ENGINES = ("podman", "docker")
#: Environment names the token is passed under (vLLM and huggingface_hub read either).
TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def gpu_flags(engine: str, rocm: bool) -> tuple[str, ...]:
    """Device flags giving the container the host's GPUs."""
    if rocm:
        return ("--device", "/dev/kfd", "--device", "/dev/dri", "--group-add", "video",
                "--security-opt", "seccomp=unconfined", "--ipc", "host")
    if engine == "docker":
        return ("--gpus", "all", "--ipc", "host")
    return ("--device", "nvidia.com/gpu=all", "--security-opt", "label=disable", "--ipc", "host")


@dataclass(frozen=True)
class ContainerWarmPlan:
    """The container run, as a value (printable, testable); holds no secret."""

    engine: str
    engine_path: str
    image: str
    model: str
    rocm: bool
    host_cache_dir: Path
    vllm_cache_dir: str
    tarball: bool
    output: Path
    argv: tuple[str, ...]
    pass_token: bool

    def to_json(self) -> dict[str, Any]:
        return {"engine": self.engine, "image": self.image, "model": self.model, "rocm": self.rocm,
                "host_cache_dir": str(self.host_cache_dir), "vllm_cache_dir": self.vllm_cache_dir,
                "tarball": str(self.output) if self.tarball else None, "argv": list(self.argv)}

    def execute(self, token: str | None = None) -> "ContainerWarmReport":
        return execute(self, token)


@dataclass(frozen=True)
class ContainerWarmReport:
    plan: ContainerWarmPlan
    duration_s: float
    metadata_path: Path
    entries: int
    tarball: Path | None

    def to_json(self) -> dict[str, Any]:
        return {**self.plan.to_json(), "duration_s": round(self.duration_s, 3), "metadata": str(self.metadata_path),
                "triton_entries": self.entries, "tarball": str(self.tarball) if self.tarball else None}

    def line(self) -> str:
        tail = f"; tarball {self.tarball}" if self.tarball else ""
        return (f"warmed {self.plan.model} in {self.duration_s:.1f} s: {self.entries} Triton kernel(s) in "
                f"{self.plan.host_cache_dir}{tail}")


def plan_container_warm(
    model: str = DEFAULT_MODEL,
    *,
    rocm: bool = False,
    engine: str = "podman",
    image: str | None = None,
    host_cache_dir: str | os.PathLike[str] = ".",
    vllm_cache_dir: str = DEFAULT_VLLM_CACHE_DIR,
    tarball: bool = False,
    output: str | os.PathLike[str] = DEFAULT_OUTPUT,
    pass_token: bool = False,
) -> ContainerWarmPlan:
    """Check the inputs and build the engine command line (nothing runs)."""
    if engine not in ENGINES:
        raise BadInputError(f"unknown --engine {engine!r} (choose podman or docker)")
    engine_path = shutil.which(engine)
    if engine_path is None:
        raise BadInputError(f"{engine} not found: install it (with GPU access) or choose another --engine")
    if not model or model.startswith("-"):
        raise BadInputError(f"bad --model {model!r}")
    if not vllm_cache_dir.startswith("/"):
        raise BadInputError(f"--vllm-cache-dir must be an absolute path inside the container, not {vllm_cache_dir!r}")
    host = Path(host_cache_dir).expanduser()
    if host.exists() and not host.is_dir():
        raise BadInputError(f"--host-cache-dir {host} is not a directory")
    out = Path(output).expanduser()
    if tarball and out.exists() and out.is_dir():
        raise BadInputError(f"--output {out} is a directory; give the tarball's file path")
    host = host.resolve()
    chosen_image = image or (ROCM_IMAGE if rocm else CUDA_IMAGE)
    env_flags: list[str] = ["-e", f"MODEL={model}", "-e", f"VLLM_CACHE_ROOT={vllm_cache_dir.rstrip('/') or '/'}"]
    if pass_token:
        for name in TOKEN_ENV:
            env_flags += ["-e", name]  # no value: the engine copies it from its own environment
    argv = (engine_path, "run", "--rm", *gpu_flags(engine, rocm), "-v", f"{host}:{vllm_cache_dir}:Z",
            *env_flags, chosen_image)
    return ContainerWarmPlan(engine, engine_path, chosen_image, model, rocm, host, vllm_cache_dir, tarball,
                             out.resolve(), argv, pass_token)


def execute(plan: ContainerWarmPlan, token: str | None = None) -> ContainerWarmReport:
    """Run the container, then write the metadata and (if asked) the tarball."""
    if token and not plan.pass_token:
        raise BadInputError("a token was given but the plan does not pass one: plan with pass_token=True")
    try:
        plan.host_cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InfercacheError(f"cannot create --host-cache-dir {plan.host_cache_dir}: {exc.strerror or exc}") from exc
    env = dict(os.environ)
    if plan.pass_token:
        for name in TOKEN_ENV:
            if token:
                env[name] = token
    logger.info("running %s", " ".join(plan.argv))  # no secret in argv by construction
    started = time.time()
    try:
        rc = subprocess.run(list(plan.argv), env=env, check=False).returncode
    except OSError as exc:
        raise InfercacheError(f"cannot run {plan.engine}: {exc.strerror or exc}") from exc
    duration = time.time() - started
    if rc != 0:
        raise InfercacheError(f"{plan.engine} run exited with status {rc}; the cache in {plan.host_cache_dir} "
                              "may be incomplete")
    entries = _triton_entries(plan.host_cache_dir)
    metadata = {
        **plan.to_json(),
        "started": iso(started),
        "finished": iso(started + duration),
        "duration_s": round(duration, 3),
        "triton_entries": entries,
        "infercache_version": _version(),
    }
    metadata.pop("argv")
    metadata_path = plan.host_cache_dir / METADATA_NAME
    atomic_write_json(metadata_path, metadata)
    tar_path = write_tarball(plan.host_cache_dir, plan.output) if plan.tarball else None
    return ContainerWarmReport(plan, duration, metadata_path, len(entries), tar_path)


def _version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("infercache")
    except metadata.PackageNotFoundError:
        return None


def _triton_entries(root: Path) -> list[Mapping[str, Any]]:
    """The Triton kernels the container left (key, name, target, place), for the metadata."""
    found = []
    for item in discover(root, "vllm"):
        for child in sorted(item.path.iterdir()):
            entry = parse_entry(child)
            if isinstance(entry, TritonEntry):
                found.append({"key": entry.key, "name": entry.name, "backend": entry.backend, "arch": entry.arch,
                              "path": str(child.relative_to(root))})
    return found


def write_tarball(root: Path, output: Path) -> Path:
    """gzip tar of `root`'s contents at exactly `output` (atomic: whole or absent).

    The tarball (and its temp file) may lie inside `root` (both default to the current dir):
    they are left out of the archive.
    """
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)

    def own_file(path: Path) -> bool:
        path = path.resolve()
        return path == output or (path.parent == output.parent and path.name.startswith(f".{output.name}.")
                                  and path.name.endswith(".tmp"))

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if own_file(root / info.name) else info

    with atomic_file(output, mode=0o644) as handle:
        with tarfile.open(fileobj=handle, mode="w:gz") as tar:
            for child in sorted(root.iterdir()):
                tar.add(child, arcname=child.name, filter=keep)
    return output

"""The warm spec (`kernels warm --spec FILE`): parse, validate, expand into compile variants.

Format (YAML)::

    targets: [cuda:90, hip:gfx942]          # optional; --target replaces it
    kernels:
      - fn: mypkg.ops:add_kernel             # import path of a @triton.jit function
        signature: {x_ptr: "*fp32", y_ptr: "*fp32", out_ptr: "*fp32", n: i32}
        constexprs: {BLOCK: [256, 1024]}     # a list is a grid: one compile per value
        options: {num_warps: [4, 8], num_stages: 3}
        specialize: {x_ptr: aligned16, n: divisible16}

Why `specialize`: Triton's cache key covers what a launch observed about each
argument, not only its type. A launch calls ``native_specialize_impl`` on every
non-constexpr argument: a pointer whose ``data_ptr() % 16 == 0`` gets
``tt.divisibility=16`` ("D"), and on AMD also ``tt.pointer_range=32`` ("S") when
its storage fits in 2 GiB (``AMDGCN_USE_BUFFER_OPS``, on by default); an integer
divisible by 16 gets "D"; an integer equal to 1 becomes the constexpr 1 (a
different signature); floats and bools are not specialized. The values here say
which of these the runtime launch will see:

- pointers: ``aligned16`` (default: PyTorch's allocator returns 256-byte aligned
  storage, so whole tensors are) or ``none`` (an offset view, e.g. ``x[1:]``);
- integers: ``divisible16`` (default: sizes and strides usually are), ``one``, ``none``;
- floats, bools: ``none`` (the only value).

Warming then builds stand-in arguments with exactly those properties and runs
Triton's own launch path on them (see :mod:`infercache.kernels.warm`), so the key
comes from Triton's code, never from a copy of it. AMD entries assume tensors under
2 GiB. Parameters marked ``do_not_specialize`` are left unspecialized by Triton
whatever the spec says, as at run time.

Validation happens before any compile; errors name the kernel and the field
(`kernels[1] (mypkg.ops:add_kernel): signature.n: ...`) and exit 2.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from infercache.errors import BadInputError
from infercache.gpu.targets import GpuTarget

POINTER_SPECIALIZE = ("aligned16", "none")
INT_SPECIALIZE = ("divisible16", "one", "none")
INT_TYPES = ("i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64")
FLOAT_TYPES = ("fp16", "bf16", "fp32", "fp64")
BOOL_TYPES = ("i1", "u1")
ELEMENT_TYPES = INT_TYPES + FLOAT_TYPES + BOOL_TYPES + (
    "fp8e4nv", "fp8e5", "fp8e4b15", "fp8e4b8", "fp8e5b16", "void")
_KERNEL_FIELDS = ("fn", "signature", "constexprs", "options", "specialize")


@dataclass(frozen=True)
class KernelSpec:
    """One `kernels:` item, validated structurally; grids kept as tuples of values."""

    index: int
    fn: str
    signature: Mapping[str, str]
    constexprs: Mapping[str, tuple[Any, ...]]
    options: Mapping[str, tuple[Any, ...]]
    specialize: Mapping[str, str]

    @property
    def label(self) -> str:
        return f"kernels[{self.index}] ({self.fn})"

    def error(self, where: str, message: str) -> BadInputError:
        return BadInputError(f"warm spec: {self.label}: {where}: {message}")

    def variants(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Every (constexprs, options) point of the grid, in a stable order."""
        names = list(self.constexprs) + list(self.options)
        values = [self.constexprs[n] for n in self.constexprs] + [self.options[n] for n in self.options]
        out = []
        for combo in itertools.product(*values):
            point = dict(zip(names, combo))
            out.append(({n: point[n] for n in self.constexprs}, {n: point[n] for n in self.options}))
        return out

    def specialization(self, name: str, type_: str) -> str:
        """What the launch sees of argument `name` (explicit, else the PyTorch-typical default)."""
        if name in self.specialize:
            return self.specialize[name]
        if type_.startswith("*"):
            return "aligned16"
        if type_ in INT_TYPES:
            return "divisible16"
        return "none"


@dataclass(frozen=True)
class WarmSpec:
    kernels: tuple[KernelSpec, ...]
    targets: tuple[str, ...] = ()
    #: Directory of the spec file: import paths resolve from there first (like `python -m`).
    base_dir: str | None = None
    source: str = field(default="<spec>", compare=False)


def parse_target(text: Any) -> str:
    """Canonical 'cuda:90' / 'hip:gfx942' (':WARP' only when not the default)."""
    return str(GpuTarget.parse(str(text)))


def load_spec(path: str | os.PathLike[str]) -> WarmSpec:
    """Read and validate a YAML spec file (BadInputError → exit 2)."""
    import yaml

    spec_path = Path(path)
    try:
        text = spec_path.read_text()
    except OSError as exc:
        raise BadInputError(f"cannot read the warm spec {spec_path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadInputError(f"warm spec {spec_path} is not valid YAML: {exc}") from None
    return parse_spec(data, base_dir=str(spec_path.resolve().parent), source=str(spec_path))


def _grid(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, list) else (value,)


def _mapping(item: Mapping[str, Any], key: str, label: str) -> dict[str, Any]:
    value = item.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise BadInputError(f"warm spec: {label}: {key}: expected a mapping of names to values")
    return dict(value)


def _check_type(kspec_label: str, name: str, type_: Any) -> str:
    if not isinstance(type_, str):
        raise BadInputError(f"warm spec: {kspec_label}: signature.{name}: expected a type string like '*fp32' or i32")
    text = type_.strip()
    base = text[1:] if text.startswith("*") else text
    if text == "constexpr" or base in ELEMENT_TYPES and not (text.startswith("*") and base == "void"):
        return text
    raise BadInputError(
        f"warm spec: {kspec_label}: signature.{name}: unknown type {type_!r} (pointers '*fp32', '*bf16', "
        f"'*i8'...; scalars {', '.join(INT_TYPES + FLOAT_TYPES + BOOL_TYPES)}; or constexpr)")


def parse_spec(data: Any, base_dir: str | None = None, source: str = "<spec>") -> WarmSpec:
    """Validate the structure (no Triton needed): fields, types, specialize values, targets, grids."""
    if not isinstance(data, Mapping):
        raise BadInputError("warm spec: expected a mapping with a `kernels:` list")
    unknown = sorted(set(data) - {"targets", "kernels"})
    if unknown:
        raise BadInputError(f"warm spec: unknown top-level field(s) {', '.join(map(str, unknown))} "
                            "(expected targets, kernels)")
    raw_targets = data.get("targets") or []
    if not isinstance(raw_targets, list):
        raise BadInputError("warm spec: targets: expected a list like [cuda:90, hip:gfx942]")
    targets = []
    for i, t in enumerate(raw_targets):
        try:
            targets.append(parse_target(t))
        except BadInputError as exc:
            raise BadInputError(f"warm spec: targets[{i}]: {exc}") from None
    raw_kernels = data.get("kernels")
    if not isinstance(raw_kernels, list) or not raw_kernels:
        raise BadInputError("warm spec: kernels: expected a non-empty list")
    kernels = [_parse_kernel(i, item) for i, item in enumerate(raw_kernels)]
    return WarmSpec(tuple(kernels), tuple(dict.fromkeys(targets)), base_dir, source)


def _parse_kernel(index: int, item: Any) -> KernelSpec:
    label = f"kernels[{index}]"
    if not isinstance(item, Mapping):
        raise BadInputError(f"warm spec: {label}: expected a mapping with fn and signature")
    fn = item.get("fn")
    if isinstance(fn, str):
        label = f"kernels[{index}] ({fn})"
    unknown = sorted(set(item) - set(_KERNEL_FIELDS))
    if unknown:
        raise BadInputError(f"warm spec: {label}: unknown field(s) {', '.join(map(str, unknown))} "
                            f"(expected {', '.join(_KERNEL_FIELDS)})")
    if not isinstance(fn, str) or fn.count(":") != 1 or not all(p.strip() for p in fn.split(":")):
        raise BadInputError(f"warm spec: {label}: fn: expected 'package.module:function', got {fn!r}")
    signature_raw = _mapping(item, "signature", label)
    if not signature_raw:
        raise BadInputError(f"warm spec: {label}: signature: required (argument name → Triton type)")
    signature = {name: _check_type(label, name, t) for name, t in signature_raw.items()}
    constexprs = {k: _grid(v) for k, v in _mapping(item, "constexprs", label).items()}
    options = {k: _grid(v) for k, v in _mapping(item, "options", label).items()}
    for what, grid in (("constexprs", constexprs), ("options", options)):
        for name, values in grid.items():
            if not values:
                raise BadInputError(f"warm spec: {label}: {what}.{name}: an empty list compiles nothing")
            for v in values:
                if isinstance(v, (Mapping, list)):
                    raise BadInputError(f"warm spec: {label}: {what}.{name}: {v!r} is not a scalar value")
    specialize = _mapping(item, "specialize", label)
    for name, value in specialize.items():
        type_ = signature.get(name)
        if type_ is None:
            raise BadInputError(f"warm spec: {label}: specialize.{name}: not an argument in the signature")
        allowed = POINTER_SPECIALIZE if type_.startswith("*") else INT_SPECIALIZE if type_ in INT_TYPES else ("none",)
        if value not in allowed:
            raise BadInputError(f"warm spec: {label}: specialize.{name}: {value!r} is not one of "
                                f"{', '.join(allowed)} for a {type_} argument")
    return KernelSpec(index, fn, signature, constexprs, options, {k: str(v) for k, v in specialize.items()})


# --- resolution against Triton (needs the `triton` extra) -------------------------------------------
@contextlib.contextmanager
def import_root(base_dir: str | None) -> Iterator[None]:
    """Import kernels from the spec's directory first, as `python -m` would from there."""
    if not base_dir or base_dir in sys.path:
        yield
        return
    sys.path.insert(0, base_dir)
    try:
        yield
    finally:
        try:
            sys.path.remove(base_dir)
        except ValueError:
            pass


def resolve_fn(kspec: KernelSpec, base_dir: str | None = None) -> Any:
    """Import `fn` and check it is a ``@triton.jit`` function."""
    module_name, attr = (part.strip() for part in kspec.fn.split(":"))
    try:
        with import_root(base_dir):
            obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the spec's fault
        raise kspec.error("fn", f"cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise kspec.error("fn", f"{module_name} has no attribute {attr!r}")
    if not (hasattr(obj, "params") and hasattr(obj, "run") and hasattr(obj, "signature")):
        raise kspec.error("fn", f"{kspec.fn} is not a @triton.jit function")
    return obj


def check_against_fn(kspec: KernelSpec, fn: Any) -> None:
    """The spec's names agree with the function's parameters (constexpr or not)."""
    names = [p.name for p in fn.params]
    constexpr = {p.name for p in fn.params if p.is_constexpr}
    for name, type_ in kspec.signature.items():
        if name not in names:
            raise kspec.error(f"signature.{name}", f"no such argument (the function takes {', '.join(names)})")
        if type_ == "constexpr" and name not in constexpr:
            raise kspec.error(f"signature.{name}", "declared constexpr but the parameter is not a tl.constexpr")
        if type_ != "constexpr" and name in constexpr:
            raise kspec.error(f"signature.{name}", "is a tl.constexpr: give its value(s) under constexprs")
    for name in kspec.constexprs:
        if name not in names:
            raise kspec.error(f"constexprs.{name}", f"no such argument (the function takes {', '.join(names)})")
        if name not in constexpr:
            raise kspec.error(f"constexprs.{name}", f"not a tl.constexpr parameter (for an integer argument "
                                                    f"of 1 write `specialize: {{{name}: one}}`)")
    for p in fn.params:
        if p.has_default:
            continue
        if p.is_constexpr and p.name not in kspec.constexprs:
            raise kspec.error("constexprs", f"missing a value for the tl.constexpr {p.name}")
        if not p.is_constexpr and p.name not in kspec.signature:
            raise kspec.error("signature", f"missing the type of argument {p.name}")


def check_options(kspec: KernelSpec, backend: Any, target: str) -> None:
    """Option names are fields of the target backend's options (num_warps, num_stages, waves_per_eu...)."""
    known = set(backend.parse_options({}).__dict__)
    for name in kspec.options:
        if name not in known:
            raise kspec.error(f"options.{name}", f"unknown option for {target} (known: {', '.join(sorted(known))})")


class LaunchPointer:
    """What a launch sees of a tensor argument: its dtype, its address and (AMD) its extent.

    Triton's specializer reads ``dtype``, ``data_ptr()`` (16-byte alignment) and, on AMD,
    ``ptr_range()`` (storage under 2 GiB enables buffer ops); nothing else of a tensor.
    """

    def __init__(self, element: str, aligned: bool) -> None:
        import triton.language as tl

        self.dtype = tl.dtype(element)
        self._ptr = 4096 if aligned else 4096 + 4

    def data_ptr(self) -> int:
        return self._ptr

    @staticmethod
    def ptr_range() -> int:
        return 1 << 20


def _stand_in(type_: str, specialize: str) -> Any:
    if type_.startswith("*"):
        return LaunchPointer(type_[1:], aligned=specialize == "aligned16")
    if type_ in BOOL_TYPES:
        return True
    if type_ in FLOAT_TYPES:
        return 1.5
    if specialize == "one":
        return 1
    base = 2**63 if type_ == "u64" else 2**32 if type_ == "i64" else 16
    return base + (16 if specialize == "divisible16" else 1)


def launch_kwargs(kspec: KernelSpec, fn: Any, constexprs: Mapping[str, Any], options: Mapping[str, Any]) -> dict:
    """Keyword arguments for `fn.run`: stand-ins with the spec's properties, constexpr values, options."""
    kwargs: dict[str, Any] = {}
    for p in fn.params:
        if p.is_constexpr:
            if p.name in constexprs:
                kwargs[p.name] = constexprs[p.name]
        elif p.name in kspec.signature:
            type_ = kspec.signature[p.name]
            kwargs[p.name] = _stand_in(type_, kspec.specialization(p.name, type_))
    kwargs.update(options)
    return kwargs


def check_launch_types(kspec: KernelSpec, fn: Any, backend: Any) -> None:
    """Each declared type is what Triton's binder derives at launch for such an argument.

    Why: a signature a launch never produces (i8 for a Python int) warms an entry no
    launch will ever look up.
    """
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    constexprs, options = kspec.variants()[0]
    _, specialization, _ = binder(**launch_kwargs(kspec, fn, constexprs, options))
    for p, (derived, _attr) in zip(fn.params, specialization):
        type_ = kspec.signature.get(p.name)
        if type_ is None or type_ == "constexpr" or p.is_constexpr:
            continue
        if kspec.specialization(p.name, type_) == "one" and derived == "constexpr":
            continue
        if derived != type_:
            raise kspec.error(
                f"signature.{p.name}", f"a launch derives {derived!r}, not {type_!r} (Python ints are i32, i64 "
                "from 2**31, u64 from 2**63; floats fp32; bools u1; tensors '*' + their dtype)")

"""Backend dispatch: Triton kernels for CUDA tensors, the PyTorch reference for everything else.

`MTP_BACKEND` overrides the choice:
  - unset / "auto": Triton when every tensor is on CUDA and Triton imports, else reference;
  - "reference": always the PyTorch reference (useful to A/B a GPU result);
  - "triton": always Triton. On CPU tensors this needs `TRITON_INTERPRET=1` (set before Triton
    is imported), which runs the kernels with numpy: that is how the tests exercise them on CPU.

`MTP_TUNE=0` keeps every launch tuner's default (`tuning_switched_off`), also for shapes tuned
before. `MTP_CROSS_COMPILE=<sm>` (e.g. 90), set only by `benchmarks/compile_check.py`: launchers
then treat CPU tensors as tensors on an sm_<sm> GPU (its tile configs, its SM count) so that the
check compiles exactly the kernels a GPU run would launch. Three switches for Hopper features, each
read where it applies: `MTP_WARP_SPEC=0|1` (the flash kernels' warp-specialized configs,
attention.warp_spec_allowed), `MTP_SKINNY_WS=0|1` (the skinny GEMM's warp-specialized tile,
skinny_ws.skinny_ws_allowed), `MTP_PDL=0` (no programmatic dependent launch,
dependent_launch.programmatic_supported).

The environment is read at call time, so tests can flip it with `monkeypatch.setenv`.
Nothing here touches the GPU driver at import time.
"""
from __future__ import annotations

import functools
import math
import numbers
import os

import torch

from .triton_import import HAVE_TRITON, MISSING

_CHOICES = ("auto", "reference", "triton")


def graph_capturing(device: torch.device) -> bool:
    """Whether the current stream of a CUDA `device` is capturing a CUDA graph: no host reads of
    device values (they would synchronize) and no tuning there. False for any other device."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def tuning_switched_off() -> bool:
    """MTP_TUNE=0: every tuner keeps its default launch or layout, also for shapes tuned before."""
    return os.environ.get("MTP_TUNE", "1").strip() == "0"


def triton_available() -> bool:
    """Whether Triton imported (triton_import.py stands in for it where it is not installed)."""
    return HAVE_TRITON


def interpreting() -> bool:
    """True when Triton kernels run under the numpy interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def cross_compile_arch() -> int | None:
    """The compute capability (e.g. 90) named by MTP_CROSS_COMPILE, or None in normal use."""
    value = os.environ.get("MTP_CROSS_COMPILE", "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"MTP_CROSS_COMPILE={value!r} must be a compute capability such as 90")
    return int(value)


# SMs of the device a cross-compile stands for (H100 SXM and H200 both have 132).
CROSS_COMPILE_SM_COUNT = 132


def gpu_launch(device: torch.device) -> bool:
    """True when a launcher should use its GPU tile configs: a CUDA device, or a cross-compile."""
    return not interpreting() and (device.type == "cuda" or cross_compile_arch() is not None)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (CUDA, or the cross-compile's stand-in)."""
    if device.type != "cuda":
        return CROSS_COMPILE_SM_COUNT
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def compute_major(device_index: int) -> int:
    """The major compute capability of CUDA device `device_index` (9: Hopper)."""
    return torch.cuda.get_device_capability(device_index)[0]


def descriptors_allowed() -> bool:
    """Whether kernels may build device-side TMA tensor descriptors here: always under the
    interpreter and in a cross-compile (nothing runs on a device), on a GPU once the scratch
    allocator is in place."""
    return interpreting() or cross_compile_arch() is not None or _descriptor_allocator_ready()


def tma_aligned(*tensors: torch.Tensor) -> bool:
    """TMA's layout rule for tensors read through descriptors: a unit last stride, a 16-byte
    aligned base, and every other stride a multiple of 16 bytes."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) for t in tensors)


def _descriptor_scratch(size: int, alignment: int, stream):
    # Device-side tensor descriptors keep their 128-byte TMA descriptor in global scratch memory;
    # inside a CUDA-graph capture this comes from the graph's pool, as every other allocation there.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _descriptor_allocator_ready() -> bool:
    """Install a torch-backed scratch allocator for device-side tensor descriptors unless the caller
    has set one. Triton keeps it in a context variable, which a new thread (autograd's backward
    thread) does not inherit, hence a check per launch. False where this Triton has no such hook."""
    try:
        import triton
        from triton.runtime import _allocation
        if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            triton.set_allocator(_descriptor_scratch)
        return True
    except (ImportError, AttributeError):
        return False


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., D) as (rows, D) with a unit column stride for a row-per-program launcher: a view
    (row strides kept, e.g. a column slice of a wider tensor) when the layout allows, else a copy."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def check_one_device(name: str, **tensors) -> None:
    """A ValueError from op `name` unless every tensor given (by argument name; None skipped) is on
    one device. The message names each argument's device, e.g. "swiglu: gate and up must be on one
    device, got gate on cuda:0, up on cpu"."""
    named = {arg: t for arg, t in tensors.items() if t is not None}
    if len({t.device for t in named.values()}) > 1:
        args = list(named)
        listed = args[0] if len(args) == 1 else ", ".join(args[:-1]) + " and " + args[-1]
        raise ValueError(f"{name}: {listed} must be on one device, got "
                         + ", ".join(f"{arg} on {t.device}" for arg, t in named.items()))


def refuse_shared_caches(name: str, k_cache: torch.Tensor, v_cache: torch.Tensor, consequence: str) -> None:
    """ValueError when k_cache and v_cache are one memory (a kernel writing or moving both would do
    it twice over one tensor, silently)."""
    if k_cache.device.type != "meta" and k_cache.numel() and k_cache.data_ptr() == v_cache.data_ptr():
        raise ValueError(f"{name}: k_cache and v_cache are the same memory: {consequence}")


def backend_name() -> str:
    name = os.environ.get("MTP_BACKEND", "auto").strip().lower() or "auto"
    if name not in _CHOICES:
        raise ValueError(f"MTP_BACKEND={name!r} is not one of {_CHOICES}")
    return name


def refuse_double_backward(op: str) -> None:
    """Called first in a kernel's backward: with create_graph=True autograd runs it in grad mode, and
    the gradients it makes come from kernels outside autograd, so a second-order gradient through
    them would silently be wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: double backward (create_graph=True) is not supported: its gradients are "
                           "computed outside autograd, so their own gradient would silently be wrong")


def finite_number(value) -> bool:
    """A finite real number, not a bool: Python's, numpy's, and torch.compile's symbolic ones (a
    SymInt/SymFloat where Dynamo made an argument dynamic; compared, not passed to math.isfinite,
    which Dynamo cannot trace). NaN fails both comparisons."""
    return (isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool)
            and -math.inf < value < math.inf)


def integer(value) -> bool:
    """An int, not a bool: Python's, numpy's, or torch.compile's SymInt."""
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


# The ops' namespace is the package's name: "mtp_kernels" as installed, another where the folder is
# imported under its own name too (`import kernels` from the repo root), so the two do not collide.
_NAMESPACE = __name__.rpartition(".")[0] or "mtp_kernels"
_KERNEL_OPS = torch.library.Library(_NAMESPACE, "FRAGMENT")   # kept alive: dropping it unregisters the ops


def kernel_op(name: str):
    """Decorator: the launcher `fn` as the torch.library custom op mtp_kernels::`name`, returned (an
    OpOverload; give it a shape function with torch.library.register_fake, and a backward with
    torch.library.register_autograd). torch.compile sees the op as one opaque call, fullgraph too,
    where Dynamo would trace into a launcher that tunes, checks and synchronizes on the host; meta
    tensors get the shape function. fn's annotations give the schema (tensors, numbers, bools,
    strings, dtypes, Optional of them; a tensor or a tuple of tensors back), and its outputs may not
    alias its inputs. Eager calls reach fn directly: torch.library.custom_op would wrap it in
    torch._disable_dynamo, whose first call imports Dynamo (about 0.6 s here, a hand timing)."""
    def register(fn):
        if hasattr(getattr(torch.ops, _NAMESPACE), name):
            raise RuntimeError(f"{_NAMESPACE}::{name} is registered already: a kernels module was imported "
                               "twice under one name (importlib.reload is not supported); restart the process")
        _KERNEL_OPS.define(name + torch.library.infer_schema(fn, mutates_args=()))
        _KERNEL_OPS.impl(name, fn, "CompositeExplicitAutograd")   # every device; meta takes the fake
        return getattr(getattr(torch.ops, _NAMESPACE), name).default
    return register


def eager_under_compile(fn):
    """`fn` as torch.compile sees it: one opaque eager call (a graph break), never traced. The Triton
    launchers tune, check and synchronize on the host, and Dynamo tracing into them (into the
    interpreter's numpy on a CPU) fails; run eagerly, a compiled model gets eager's results and
    gradients. Outside a compile `fn` is called as it is: torch._disable_dynamo's wrapper imports
    Dynamo at its first call, an import as slow as torch's own that code which never compiles should
    not pay (tests/test_bad_inputs.py checks it is not imported)."""
    disable = getattr(torch, "_disable_dynamo", None)
    if disable is None:
        return fn
    disabled = disable(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return disabled(*args, **kwargs) if torch.compiler.is_compiling() else fn(*args, **kwargs)
    return call


def use_triton(*tensors: torch.Tensor) -> bool:
    """Decide whether the Triton kernel should run for these tensors."""
    name = backend_name()
    if name == "reference" or any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
        return False   # (meta tensors have shapes and no data: the reference gives the shapes)
    on_cuda = all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if cross_compile_arch() is not None:
        return triton_available()
    if name == "triton":
        if not triton_available():
            raise RuntimeError(f"MTP_BACKEND=triton: {MISSING}")
        if not on_cuda and not interpreting():
            raise RuntimeError(
                "MTP_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set before Triton is imported"
            )
        return True
    return on_cuda and triton_available()

"""Programmatic dependent launch (PDL, Hopper and later): a decode step's next kernel starts while the
one before it finishes, and waits for it only where it touches memory.

A decode step of the 7B model at batch 1 is about 210 kernels of 5 to 45 us. Between two of them the
GPU drains: the last programs of one kernel run on a few SMs while the others idle, then the next
kernel's programs are placed and their first loads wait a microsecond or so on HBM. In the H200's
decode GEMM tuning (nineteenth session, generate_nvidia-h200.md) the one-row GEMMs ran 2-4 us
above their bytes' time at the measured copy bandwidth.

A kernel launched with `launch_pdl=True` may be started once every program of the kernel before it
on the stream has called `gdc_launch_dependents` (or ended). Its programs then stop in `gdc_wait`
until that kernel has ended and its writes are visible. The rules every launch here keeps, so that
memory order is exactly that of ordinary launches:
  - a programmatic kernel calls `await_prior_grid` before it loads anything a kernel before it may
    have written and before any store; the only work before the wait is loading weights, which no
    kernel of ours writes (the skinny GEMMs load their first weight tile there unless
    `skinny_linear.EARLY_WEIGHT_TILE` is False; a kernel of PyTorch's that wrote weights, a copy,
    has no programmatic trigger, so the next kernel starts only once it has ended);
  - it signals its dependents only after its own wait, so at most two kernels' programs share the
    GPU, and the next kernel's programs are placed only once this kernel's last programs have started:
    they take no room this kernel still needs;
  - kernels launched without the attribute (cuBLAS, PyTorch's own) keep full stream order on both
    sides, and a programmatic kernel after one of them simply starts when it ends.
The generator captures its decode and verify steps with PDL and without, times both and keeps the
faster (`CUDAGraphSteps` variants), so it only runs where it pays. Launches traced inside
`programmatic_launch()` are programmatic; a launcher asks `launch_programmatic(device)`.
`MTP_PDL=0` switches it off everywhere (read at call time).

Under the interpreter each launch ends before the next starts, so there is nothing to wait for, and
the interpreter cannot run the PTX of the wait: `await_prior_grid` does nothing there, which lets the
tests run a programmatic launch's other code paths (the skinny GEMM's early first tile).
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch
from .triton_import import gdc_launch_dependents, gdc_wait, tl, triton

from .backend import compute_major, cross_compile_arch, interpreting

_ENABLED = contextvars.ContextVar("programmatic_launch", default=False)
# Triton decides at import whether kernels run under the interpreter; so does this.
_GRID_CONTROL = tl.constexpr(not interpreting())


@contextlib.contextmanager
def programmatic_launch(enabled: bool = True):
    """Launches traced inside are programmatic dependent launches where the device supports them
    (`launch_programmatic`); enabled=False switches them off inside."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def programmatic_supported(device: torch.device) -> bool:
    """Whether launches on `device` can be programmatic: a CUDA device of compute capability 9 or more
    (or a cross-compile for one, benchmarks/compile_check.py); never under the interpreter, nor
    with MTP_PDL=0."""
    if interpreting() or os.environ.get("MTP_PDL", "").strip() == "0":
        return False
    arch = cross_compile_arch()
    if arch is not None:
        return arch >= 90
    if device.type != "cuda":
        return False
    return compute_major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


def launch_programmatic(device: torch.device) -> bool:
    """Whether a launch on `device` traced now is programmatic: inside `programmatic_launch()` on a
    device that supports it."""
    return _ENABLED.get() and programmatic_supported(device)


@triton.jit
def await_prior_grid(PDL: tl.constexpr):
    """In a programmatic launch (PDL): wait until the kernel before this one has ended and its writes
    are visible, then let the kernel after this one be placed. A no-op otherwise."""
    if PDL and _GRID_CONTROL:
        gdc_wait()
        gdc_launch_dependents()

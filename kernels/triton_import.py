"""Triton where it is installed, else a stand-in, so that the package imports without it.

Triton ships wheels for Linux only. On macOS or Windows (or wherever it is missing) every kernel
module still imports, `backend.triton_available()` is False and every call runs the PyTorch
reference, as the project promises for a laptop. The stand-in defines the `@triton.jit` kernels
without compiling anything (calling or launching one raises an error that says Triton is missing),
lets module-level constants and annotations name `tl.constexpr` and friends, and keeps the host
helpers that the reference path shares with the kernels (`cdiv`, `next_power_of_2`).

Kernel modules take `triton`, `tl` and Triton's error base from here, never from Triton itself.
"""
from __future__ import annotations

import types

MISSING = ("Triton is not installed (it has wheels for Linux only): the PyTorch reference path runs "
           "without it; unset MTP_BACKEND or set it to 'reference'")


class _NotCompiled:
    """A @triton.jit function defined without Triton: calling or launching it raises."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = getattr(fn, "__doc__", None)

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__}: {MISSING}")


class _Anything:
    """Stands for any `tl` name in module-level code (tl.constexpr(...), annotations, dtypes)."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self


def _decorator(fn=None, **kwargs):
    """@triton.jit, @triton.jit(...): the function, never compiled."""
    return _NotCompiled(fn) if fn is not None else _NotCompiled


def _passing_through(*args, **kwargs):
    """@triton.autotune(...), @triton.heuristics(...): the decorated kernel unchanged."""
    return lambda fn: fn


class _Config:
    """triton.Config's fields, for the launch tables that kernel modules build at import."""

    def __init__(self, kwargs, num_warps=4, num_stages=2, **options):
        self.kwargs, self.num_warps, self.num_stages = dict(kwargs), num_warps, num_stages
        self.__dict__.update(options)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


try:
    import triton
    import triton.language as tl
    try:   # the base of Triton's compile, ptxas and resource errors (OutOfResources alone before it existed)
        from triton.errors import TritonError
    except ImportError:  # pragma: no cover - older Triton
        from triton.runtime.errors import OutOfResources as TritonError
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

    class TritonError(Exception):   # noqa: N818 - Triton's name
        """Never raised: nothing compiles without Triton."""

    tl = _Anything()
    triton = types.SimpleNamespace(jit=_decorator, autotune=_passing_through, heuristics=_passing_through,
                                   Config=_Config, cdiv=cdiv, next_power_of_2=next_power_of_2, language=tl,
                                   __version__="0 (not installed)")

if HAVE_TRITON:
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError as error:   # an installed Triton older than setup.py's floor: say so, never fall back
        raise ImportError(f"mtp-engine needs Triton >= 3.4 (programmatic launch's gdc_wait), found "
                          f"{triton.__version__}: pip install -U 'triton>=3.4'") from error
else:
    gdc_launch_dependents = gdc_wait = _NotCompiled(lambda: None)

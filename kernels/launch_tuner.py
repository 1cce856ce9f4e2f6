"""Per-shape launch choice by timing on the device, for launches `triton.autotune` cannot choose.

Triton's autotuner picks among configs of one kernel, timed with eager launches. Two choices here
need more: KV-cache attention's split count changes its grid, its scratch buffers and whether a
second kernel runs, and a skinny GEMM may be better left to cuBLAS. Their kernels also take a few
microseconds, less than a Python launch, so an eager timing measures the host. `LaunchTuner` times
each candidate as the generator runs it, replayed from a CUDA graph, at the first call of a shape
outside a graph capture, and keeps the fastest for that shape. Inside a capture (no timing there) or
with tuning off, a shape not yet tuned takes the caller's fallback. A tuner given a reference
(`close_to`) runs every candidate once against it and leaves out one that computes other values, so
a launch wrong on some device can lose but never win. A failed tuning run only warns:
tuning is a speed-up, never a new way to fail. `MTP_TUNE=0` turns every tuner off (another process
may otherwise pick another launch, which changes float summation order in the last bits).

A timing must also not find its operands where a real step never does: `rotating_copies` gives a
launch the next of several copies of an operand at each call, so that one smaller than the L2 cache
is read from HBM every time, as it is between two uses in a decode step.
"""
from __future__ import annotations

import itertools
import warnings
from typing import Callable, Dict, Hashable, Sequence

import torch
from .backend import graph_capturing, tuning_switched_off
from .triton_import import TritonError


def tuning_enabled(device: torch.device) -> bool:
    """Tune on CUDA, outside a graph capture, unless MTP_TUNE=0 (read at call time)."""
    return not tuning_switched_off() and device.type == "cuda" and not graph_capturing(device)


GRAPH_CALLS = 10   # fn() calls captured in one graph by cuda_graph_ms


def l2_cache_bytes(device: torch.device) -> int:
    """The L2 cache size of a CUDA device in bytes (H100: 50 MiB); 0 elsewhere (nothing to rotate)."""
    return torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0


def rotation_count(nbytes: int, l2_bytes: int, calls: int = GRAPH_CALLS) -> int:
    """How many copies of an operand of `nbytes` a timing of `calls` back-to-back calls rotates over:
    the fewest that together hold at least twice the L2, so that each copy has left the cache
    before its next use; at most `calls`. Rounded up to a divisor of `calls`: a graph of `calls` calls
    then cycles through whole rounds of copies, so the copy of its last call is never the one of the
    first call of the next replay, wherever the cycle stood when the capture began."""
    need = max(1, -(-2 * l2_bytes // max(nbytes, 1)))
    return next(d for d in range(min(need, calls), calls + 1) if calls % d == 0)


def rotating_copies(tensor: torch.Tensor, l2_bytes: int | None = None,
                    calls: int = GRAPH_CALLS) -> Callable[[], torch.Tensor]:
    """A function that returns `tensor` or one of its clones, the next one at every call, cycling over
    `rotation_count` of them (l2_bytes: the L2 size, by default that of tensor's device).

    `cuda_graph_ms` captures `calls` calls of one launch back to back. A weight smaller than the L2
    (the 7B model's 32 MB `wo` against the H100's 50 MB) would then stay in L2 from one call to the
    next and read faster than HBM allows (up to 5.2 TB/s on the H100), which a decode step, where
    the other 31 layers' weights pass through L2 between two uses, never sees; and the kernels
    compared need not gain alike from it. Each timed call instead reads the next copy. The copies
    live as long as the returned function: drop it after tuning to free them."""
    if l2_bytes is None:
        l2_bytes = l2_cache_bytes(tensor.device)
    count = rotation_count(tensor.numel() * tensor.element_size(), l2_bytes, calls)
    copies = [tensor] + [tensor.clone() for _ in range(count - 1)]
    return itertools.cycle(copies).__next__


def cuda_graph_ms(fn: Callable[[], object], calls: int = GRAPH_CALLS, replays: int = 5, rounds: int = 3) -> float:
    """GPU ms of one fn() as a CUDA-graph step runs it: `calls` back-to-back calls captured in one
    graph (host launch cost does not count), replayed `replays` times; the best of `rounds`."""
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    best = float("inf")
    with torch.cuda.stream(stream):
        fn()   # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
        graph.replay()
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for _ in range(replays):
                graph.replay()
            end.record(stream)
            end.synchronize()
            best = min(best, start.elapsed_time(end) / (calls * replays))
    torch.cuda.current_stream().wait_stream(stream)
    del graph
    return best


def close_to(reference, rtol: float = 1e-2) -> Callable[[object], bool]:
    """A tuner's `agrees`: whether a result is finite and within rtol of `reference` in norm,
    |out - reference| <= rtol |reference| over all elements (float32; any shape with reference's
    number of elements). reference may be a tuple of tensors (a launch's several outputs): then
    each element of the result must agree with its own. 1e-2 passes any rounding of a bf16 GEMM's
    sums (about 1e-3) and fails one wrong row among 64 (a row of garbage of the right size is about
    18% of the norm), any NaN or inf."""
    if isinstance(reference, (tuple, list)):
        parts = [close_to(r, rtol) for r in reference]
        return lambda out: len(out) == len(parts) and all(agrees(o) for agrees, o in zip(parts, out))
    ref = reference.detach().float().reshape(-1)
    bound = rtol * float(ref.norm())

    def agrees(out: torch.Tensor) -> bool:
        out = out.detach().float().reshape(-1)
        return out.numel() == ref.numel() and bool(torch.isfinite(out).all()) and float((out - ref).norm()) <= bound
    return agrees


class LaunchTuner:
    """Remembers, per shape key, the fastest of a set of candidate launches."""

    def __init__(self, name: str):
        self.name = name
        self.chosen: Dict[Hashable, object] = {}
        self.times: Dict[Hashable, dict] = {}   # key -> {candidate: ms} of its tuning run, for reports

    def tune(self, key: Hashable, candidates: Sequence, run: Callable[[object], object],
             timer: Callable | None = None, agrees: Callable[[object], bool] | None = None,
             probe: Callable[[object], object] | None = None) -> dict:
        """Time run(candidate) for every candidate (timer(fn) -> ms, default `cuda_graph_ms`), keep
        the fastest under `key` and return {candidate: ms}. A candidate that raises RuntimeError or a
        Triton error (resources, compilation, ptxas) counts as infinitely slow, and so, with a
        warning, does one whose result agrees(probe(candidate)) refuses (e.g. `close_to` a reference:
        a launch that computes wrong values on this device must never win on speed). probe defaults
        to run; a launch that also writes elsewhere (a cache, a residual stream) probes those writes
        too, outside the timings. RuntimeError when none runs."""
        timer = timer or cuda_graph_ms
        probe = probe or run
        times = {}
        for candidate in candidates:
            try:
                if agrees is not None and not agrees(probe(candidate)):
                    warnings.warn(f"{self.name}: {candidate} gives results that disagree with the reference for "
                                  f"{key}; left out")
                    times[candidate] = float("inf")
                    continue
                times[candidate] = float(timer(lambda candidate=candidate: run(candidate)))
            except (RuntimeError, TritonError):   # a launch that cannot run (resources, compile, capture) loses
                times[candidate] = float("inf")
        best = min(times, key=times.get)
        if times[best] == float("inf"):
            raise RuntimeError(f"{self.name}: none of {list(times)} runs for {key}")
        self.chosen[key] = best
        self.times[key] = times
        return times

    def choose(self, key: Hashable, device: torch.device, tune: Callable[[], object],
               fallback: Callable[[], object]):
        """The launch for `key`: the tuned one, tuning it now (tune(), which calls `self.tune` for
        `key`) when allowed, else fallback(). Nothing but a dict lookup once `key` is known;
        MTP_TUNE=0 gives fallback() whatever was tuned before."""
        if tuning_switched_off():
            return fallback()
        if key in self.chosen:
            return self.chosen[key]
        if tuning_enabled(device):
            try:
                tune()
            except (RuntimeError, TritonError) as err:
                warnings.warn(f"{self.name}: launch tuning failed for {key}, keeping the default launch: {err}")
                self.chosen[key] = fallback()
            return self.chosen[key]
        return fallback()

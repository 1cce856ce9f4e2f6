"""x @ weight.T for the few rows of a CPU decode or verify step, in the BLAS layout timed faster.

A decode step multiplies one row per sequence by every weight; a verify step batch x tree nodes
rows. On the CPU, F.linear hands the BLAS x (M, K) times weight^T, and with MKL (the x86 build of
torch) 4 rows cost 2.0-3.7x one row on a 2-core AMD EPYC (the float32 weights of a dim-1024 model,
benchmarks/results/cpu_decode_cpu.md), so a 4-node verify step cost 3.5-3.9 plain steps and
speculative decoding could not pay on the CPU. The same product asked as weight (N, K) times x^T
(M columns; the (N, M) result transposed back) took 0.5-1.8x the one-row F.linear for those 4 rows.
A single row is a matrix-vector product, which read the 131 MB unembedding there at 21 GB/s (6.2 ms)
where the same call on the row and a row of zeros read it at 41 GB/s (3.2 ms), so one row also tries
that ("padded"). Which layout wins depends on the BLAS, the CPU, the shape and the thread count, so
it is timed at the first call of each (dtype, rows up to a power of two, N, K, threads) and
remembered; the benchmark lists every timing. A timing costs a few calls of the product, so the rows
count through their power of two (prompts of every length share a few timings) and products under
_WORTH_TIMING_S are not timed at all. `MTP_TUNE=0` keeps F.linear (the layouts sum in different
orders, so another process could otherwise round the last bits differently). Autograd and more than
MAX_ROWS rows (long prefills, training) always take F.linear.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Tuple

import torch

from .backend import tuning_switched_off

MAX_ROWS = 64            # the rows of a decode or verify step (batch x tree nodes) this file takes
LAYOUTS = ("linear", "transposed", "padded")   # "padded": one row only
_MIN_TIMED_S = 2e-4      # a timed sample repeats a call until it lasts this long (perf_counter noise)
_WORTH_TIMING_S = 2e-5   # products faster than this keep F.linear untimed (a one-shot run pays the timing)

_chosen: Dict[Tuple, str] = {}
_times: Dict[Tuple, Dict[str, float]] = {}   # key -> {layout: ms per call} of its timing, for reports


def layouts_for(rows: int) -> tuple:
    """The layouts timed for `rows` rows: "padded" only for one."""
    return LAYOUTS if rows == 1 else LAYOUTS[:2]


def rows_times_weight_t(x: torch.Tensor, weight: torch.Tensor, layout: str) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T -> (M, N), contiguous, in `layout`: "linear" (F.linear),
    "transposed" (weight @ x^T, transposed back) or "padded" (M = 1: "transposed" over x and a row of
    zeros, whose column is dropped)."""
    if layout == "linear":
        return torch.nn.functional.linear(x, weight)
    if layout == "transposed":
        return torch.mm(weight, x.t()).t().contiguous()
    if layout == "padded":
        if x.shape[0] != 1:
            raise ValueError(f"cpu_linear: the padded layout takes one row, got {x.shape[0]}")
        pair = torch.cat([x, x.new_zeros(1, x.shape[1])])
        return torch.mm(weight, pair.t())[:, :1].t().contiguous()
    raise ValueError(f"cpu_linear: unknown layout {layout!r}; known: {LAYOUTS}")


def _seconds(fn: Callable[[], object], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def time_layouts(x: torch.Tensor, weight: torch.Tensor, rounds: int = 3) -> Dict[str, float]:
    """ms per call of each layout: the best of `rounds` samples, the layouts sampled in turn (so
    that a frequency change or a neighbour's load hits both), each sample repeating the call until
    it lasts _MIN_TIMED_S. A product whose first F.linear call took under _WORTH_TIMING_S is not
    timed further: {"linear": that call's ms}."""
    calls = {layout: (lambda layout=layout: rows_times_weight_t(x, weight, layout))
             for layout in layouts_for(x.shape[0])}
    first = {layout: _seconds(fn, 1) for layout, fn in calls.items()}
    if first["linear"] < _WORTH_TIMING_S:   # a layout could save microseconds; timing costs a millisecond
        return {"linear": first["linear"] * 1e3}
    repeats = {layout: max(1, int(_MIN_TIMED_S / max(seconds, 1e-9))) for layout, seconds in first.items()}
    best = {layout: float("inf") for layout in calls}
    for _ in range(rounds):
        for layout, fn in calls.items():
            best[layout] = min(best[layout], _seconds(fn, repeats[layout]))
    return {layout: seconds * 1e3 for layout, seconds in best.items()}


def row_bucket(rows: int) -> int:
    """The power of two at or above `rows`: the row count of a timing's key."""
    return 1 << max(rows - 1, 0).bit_length()


def cpu_layout(x: torch.Tensor, weight: torch.Tensor) -> str:
    """The layout for x (M, K) against weight (N, K) on the CPU: the one remembered for M's
    `row_bucket`, else timed now on x (MTP_TUNE=0: "linear", untimed). A tie keeps "linear".
    "padded" is kept for one row only: a bucket of more rows times the other two."""
    if tuning_switched_off():   # also for shapes timed before the switch
        return "linear"
    key = (x.dtype, row_bucket(x.shape[0]), weight.shape[0], weight.shape[1], torch.get_num_threads())
    layout = _chosen.get(key)
    if layout is None:
        times = time_layouts(x, weight)
        layout = min(times, key=lambda name: (times[name], name != "linear"))
        _chosen[key], _times[key] = layout, times
    return layout


def matmul_t(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T -> (..., N), as F.linear without bias. CPU tensors of at most
    MAX_ROWS rows outside autograd go through the layout timed faster for their shape (`cpu_layout`);
    everything else is F.linear."""
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if (x.device.type != "cpu" or not 1 <= rows <= MAX_ROWS or weight.dim() != 2 or weight.device != x.device
            or x.dtype != weight.dtype or weight.shape[1] != K
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return torch.nn.functional.linear(x, weight)
    x2 = x.reshape(rows, K)
    return rows_times_weight_t(x2, weight, cpu_layout(x2, weight)).view(*x.shape[:-1], weight.shape[0])


def chosen_layouts() -> Dict[Tuple, Dict[str, object]]:
    """Every shape timed so far: key -> {"layout": chosen, "ms": {layout: ms per call}}."""
    return {key: {"layout": _chosen[key], "ms": dict(_times[key])} for key in _chosen}

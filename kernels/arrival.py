"""Arrival counters: the last program of a split launch finishes the reduction, in the same kernel.

A split launch (KV splits of a decode attention, K splits of a skinny GEMM) has several programs
write partial results that a second kernel used to combine. Each extra kernel in a decode step costs
its launch and its ramp (on the H100, merging KV splits in the attention kernel instead saved 0.7-1.3
us, 1-10%, of each decode call at batch 1 and 8; tenth session, NOTES.md). Here instead every
program of a group writes its partial and then takes a ticket: an atomic add on the group's counter.
The program that draws the last ticket reads all partials of its group in a fixed order, writes the
result and puts the counter back to 0. The combine order does not depend on which program came
last, so the result is deterministic.

Memory ordering (GPU): `tl.debug_barrier()` before the ticket makes every thread's partial stores
happen before the atomic, whose acq_rel semantics publish them at device scope; the last program
reads the partials through L2 (`cache_modifier=".cg"`), never a stale L1 line.

Counters are int32 zeros kept per device and stream for the life of the process, so that CUDA
graphs captured with them stay valid, and every launch leaves them at zero. Launches on one stream
run one after another, so they can share a buffer; launches on different streams may run at once
(the head blocks of a captured verify step, `mtp_engine/branches.py`), so each stream has its own.
A launch that needs more counters than exist gets a larger buffer (the old one is kept for graphs
that use it). Inside a graph capture a new buffer cannot be zeroed before the graph first runs, so
there the call gets counters of its own, zeroed by a memset node in the graph.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from .triton_import import tl, triton

from .backend import graph_capturing

_POOLS: Dict[Tuple[str, int], List[torch.Tensor]] = {}   # (device, stream) -> buffers, the newest (largest) last
_MIN_COUNTERS = 4096


def _pool_key(device: torch.device) -> Tuple[str, int]:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    return str(device), stream


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n zero int32 counters on `device` for launches on the current stream, which the
    kernels using them leave at zero."""
    if n < 1:
        raise ValueError(f"arrival_counters: need at least one counter, got {n}")
    pool = _POOLS.setdefault(_pool_key(device), [])
    if pool and pool[-1].numel() >= n:
        return pool[-1]
    if graph_capturing(device):
        return torch.zeros(n, dtype=torch.int32, device=device)
    size = max(_MIN_COUNTERS, triton.next_power_of_2(n))
    pool.append(torch.zeros(size, dtype=torch.int32, device=device))
    return pool[-1]


@triton.jit
def last_to_arrive(counter, n_arrivals):
    """Take a ticket on `counter` (a pointer to this group's int32 counter) after storing this
    program's partial; True in the group's last program, which also resets the counter to 0."""
    tl.debug_barrier()
    ticket = tl.atomic_add(counter, 1, sem="acq_rel")
    is_last = ticket == n_arrivals - 1
    if is_last:
        tl.store(counter, 0)
    return is_last

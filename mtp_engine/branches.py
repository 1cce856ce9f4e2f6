"""Independent calls as concurrent branches of a CUDA graph (the head blocks of a verify step).

A verify step runs every head block over every tree node, and each head block takes the trunk's
output and nothing from the other heads. Issued one after another on one stream, each of a head's
~9 kernels waits for the one before, and every projection GEMM pays its ramp-up and its last partial
wave alone: at 64 rows the 32 MB `wo` read at 2.25 TB/s against 2.5 at one row and a copy rate of
3.0 (H100, tenth session, NOTES.md). Issued on separate streams while a graph is captured, the heads
become parallel branches of the graph, so one head's small kernels and GEMM tails can run beside
another head's GEMMs. A plain decode step runs one head and is unchanged.

Only inside a capture. Eager calls stay on one stream, so a launch tuner that times a new shape on
the GPU (skinny_linear, KV-cache attention, Triton's autotuner) never runs beside other work; the
eager warm-up runs before a capture (CUDAGraphSteps) have tuned every shape the captured branches
launch. Kernels that combine through arrival counters take each stream's own (`mtp_kernels.arrival`),
and none of them waits on another program, so concurrent launches cannot deadlock. Tensor-parallel
models turn this off: their blocks all-reduce, and every rank must issue its collectives in the same
order.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch

from mtp_kernels.arrival import arrival_counters
from mtp_kernels.backend import graph_capturing

_SIDE_STREAMS: Dict[str, List["torch.cuda.Stream"]] = {}   # str(device) -> streams, made outside captures


def side_streams(device: torch.device, n: int) -> list:
    """n CUDA streams of `device` for concurrent branches, the same ones on every call, each prepared
    for capture (`prepare_stream`) when made: call this once outside a capture, as `run_branches`
    does in eager calls."""
    streams = _SIDE_STREAMS.setdefault(str(device), [])
    while len(streams) < n:
        stream = torch.cuda.Stream(device=device)
        with torch.cuda.stream(stream):
            prepare_stream(device)
        streams.append(stream)
    return streams[:n]


def prepare_stream(device: torch.device) -> None:
    """What the current stream would otherwise allocate inside its first capture: its arrival
    counters (else a memset node per launch in the graph), and cuBLAS's workspaces, which torch
    keeps per stream and allocates at a stream's first GEMM (warming streams up before a capture is
    what torch's CUDA-graph notes ask for)."""
    arrival_counters(device, 1)
    probe = torch.ones(8, 8, device=device)
    torch.addmm(probe[0], probe, probe)   # bias epilogue: the cuBLASLt path and its workspace
    torch.mm(probe, probe)


def run_branches(calls: Sequence[Callable[[], object]], device: torch.device, concurrent: bool = True) -> list:
    """[call() for call in calls], the calls independent of each other. While the current CUDA stream
    is being captured (and `concurrent`), calls[1:] each run on a side stream forked from the current
    one and joined back after calls[0], which runs on the current stream: parallel branches of the
    graph. Otherwise in order, on the current stream."""
    if len(calls) < 2 or not concurrent or device.type != "cuda":
        return [call() for call in calls]
    if not graph_capturing(device):
        side_streams(device, len(calls) - 1)   # made (with their counters) before the first capture
        return [call() for call in calls]
    main = torch.cuda.current_stream(device)
    results: list = [None] * len(calls)
    sides = side_streams(device, len(calls) - 1)
    for i, side in enumerate(sides, start=1):
        side.wait_stream(main)    # fork: the branch starts after what the main stream issued so far
        with torch.cuda.stream(side):
            results[i] = calls[i]()
    results[0] = calls[0]()
    for side in sides:
        main.wait_stream(side)    # join: the capture must end on the stream it began on
    return results

"""Arrival counters (kernels/arrival.py): the last program of a group combines, counters end at zero."""
import pytest
import torch
import triton
import triton.language as tl

from mtp_kernels.arrival import arrival_counters, last_to_arrive
from mtp_kernels.backend import interpreting


@triton.jit
def _split_sum_kernel(X, PART, OUT, COUNTERS, n_cols, n_splits, BLOCK: tl.constexpr):
    # Group = row; each split sums its BLOCK columns of the row into PART, the last one sums PART.
    row = tl.program_id(0)
    split = tl.program_id(1)
    offs = split * BLOCK + tl.arange(0, BLOCK)
    part = tl.sum(tl.load(X + row * n_cols + offs, mask=offs < n_cols, other=0.0), 0)
    tl.store(PART + row * n_splits + split, part)
    if last_to_arrive(COUNTERS + row, n_splits):
        total = 0.0
        for s in range(0, n_splits):
            total += tl.load(PART + row * n_splits + s, cache_modifier=".cg")
        tl.store(OUT + row, total)


@pytest.mark.skipif(not interpreting(), reason="runs the kernel on CPU tensors under the interpreter")
def test_last_program_of_each_group_combines_and_counters_end_at_zero():
    torch.manual_seed(0)
    rows, n_cols, block = 5, 37, 8
    n_splits = triton.cdiv(n_cols, block)
    x = torch.randn(rows, n_cols)
    counters = arrival_counters(x.device, rows)
    for _ in range(2):   # a second launch finds the counters reset by the first
        part = torch.empty(rows, n_splits)
        out = torch.full((rows,), float("nan"))
        _split_sum_kernel[(rows, n_splits)](x, part, out, counters, n_cols, n_splits, BLOCK=block)
        torch.testing.assert_close(out, x.sum(1))
        assert int(counters.abs().sum()) == 0


def test_pool_grows_and_keeps_zeroed_buffers():
    device = torch.device("cpu")
    small = arrival_counters(device, 3)
    assert small.dtype == torch.int32 and small.numel() >= 3 and int(small.abs().sum()) == 0
    assert arrival_counters(device, 2) is small   # reused while large enough
    big = arrival_counters(device, small.numel() + 1)
    assert big.numel() > small.numel() and int(big.abs().sum()) == 0
    assert arrival_counters(device, 1) is big
    with pytest.raises(ValueError, match="at least one counter"):
        arrival_counters(device, 0)


@pytest.mark.gpu
def test_gpu_many_groups_race_free_and_deterministic():
    # Thousands of programs racing for 512 counters: a lost partial or a stale read would change the
    # sum, a combine order that depended on arrival would change its last bits between launches.
    torch.manual_seed(0)
    rows, n_cols, block = 512, 8192, 64
    n_splits = triton.cdiv(n_cols, block)
    x = torch.randn(rows, n_cols, device="cuda")
    counters = arrival_counters(x.device, rows)
    part = torch.empty(rows, n_splits, device="cuda")
    first = None
    for _ in range(20):
        out = torch.full((rows,), float("nan"), device="cuda")
        _split_sum_kernel[(rows, n_splits)](x, part, out, counters, n_cols, n_splits, BLOCK=block)
        if first is None:
            first = out.clone()
            torch.testing.assert_close(out.double(), x.double().sum(1), rtol=1e-5, atol=1e-3)
        assert torch.equal(out, first)
    assert int(counters.abs().sum()) == 0

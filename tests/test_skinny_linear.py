"""The decode GEMM kernel (skinny_linear.py): every tile the tuner may pick against a float64 oracle
(interpreter), the dispatch rules, and on a GPU the bf16 launches and the tuned choice."""
import pytest
import torch

from mtp_kernels import skinny_linear as sl
from mtp_kernels.launch_tuner import LaunchTuner, cuda_graph_ms


def _inputs(M, N, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 37, 33), (1, 64, 128), (3, 37, 96), (16, 48, 64), (7, 1, 5),
                                   (17, 37, 40), (32, 16, 48), (37, 21, 33), (64, 16, 16)])
def test_every_candidate_matches_the_oracle(triton_backend, dtype, M, N, K):
    x, w = _inputs(M, N, K, dtype, seed=M * 100 + N + K)
    want = x.double() @ w.double().T
    candidates = sl.skinny_candidates(M, x.device)
    assert candidates[0] is None and len(candidates) == {1: 5, 16: 3, 32: 2, 64: 2}[sl.row_tile(M)]
    assert all(c.block_m == max(16, sl.row_tile(M)) for c in candidates[1:] if c.use_dot)
    for launch in candidates:
        y = sl.skinny_linear_run(x, w, launch)
        assert y.shape == (M, N) and y.dtype == dtype
        tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-3, atol=5e-3)
        torch.testing.assert_close(y.double(), want, **tol, msg=lambda m: f"{launch}: {m}")


def test_strided_weight_rows_and_a_multiply_add_launch_needs_one_row(triton_backend):
    x, w = _inputs(2, 40, 24, torch.float32, seed=5)
    wide = torch.randn(60, 24)
    wide[10:50] = w
    view = wide[10:50]                                  # a row slice: stride (24, 1), as rows_view gives
    for launch in sl.skinny_candidates(2, x.device):
        torch.testing.assert_close(sl.skinny_linear_run(x, view, launch), x @ w.T, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="multiply-add launch takes one row, got 2"):
        sl.skinny_linear_run(x, w, sl.SkinnyLaunch(16, 32, use_dot=False))
    with pytest.raises(ValueError, match="16-row tile takes at most 16 rows, got 17"):
        sl.skinny_linear_run(torch.randn(17, 24), w, sl.SkinnyLaunch(16, 32, use_dot=True))


def test_rows_share_a_tuning_per_row_tile():
    assert [sl.row_tile(M) for M in (1, 2, 16, 17, 32, 33, 64)] == [1, 16, 16, 32, 32, 64, 64]
    for bad in (0, 65):
        with pytest.raises(ValueError, match="1 to 64 rows"):
            sl.row_tile(bad)


def test_dispatch_uses_the_tuned_launch_and_falls_back_to_f_linear(triton_backend, monkeypatch):
    tuner = LaunchTuner("skinny_linear")
    monkeypatch.setattr(sl, "_TUNER", tuner)
    x, w = _inputs(3, 40, 24, torch.float32, seed=6)
    x3 = x.view(1, 3, 24)
    # nothing tuned (CPU tensors are never tuned): cuBLAS's stand-in, F.linear
    torch.testing.assert_close(sl.skinny_linear(x3, w), torch.nn.functional.linear(x3, w))
    launch = sl.SkinnyLaunch(32, 16, use_dot=True, num_warps=1, num_stages=1)
    tuner.chosen[("cpu", torch.float32, 16, 40, 24)] = launch       # 3 rows: the 16-row tile's tuning
    used = []
    run = sl.skinny_linear_run
    monkeypatch.setattr(sl, "skinny_linear_run", lambda a, b, c: used.append(c) or run(a, b, c))
    out = sl.skinny_linear(x3, w)
    assert used == [launch] and out.shape == (1, 3, 40)
    torch.testing.assert_close(out, torch.nn.functional.linear(x3, w), rtol=1e-5, atol=1e-4)
    # more rows than the largest tile, autograd, or mismatched dtypes: F.linear, never the kernel
    used.clear()
    big = torch.randn(65, 24)
    torch.testing.assert_close(sl.skinny_linear(big, w), big @ w.T)
    wg = w.clone().requires_grad_()
    sl.skinny_linear(x3, wg).sum().backward()
    torch.testing.assert_close(wg.grad, x.sum(0).expand(40, 24))
    torch.testing.assert_close(sl.skinny_linear(x3.double(), w.double()), x3.double() @ w.double().T)
    assert used == []


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(1, 12288, 4096), (1, 4096, 11008), (4, 22016, 4096), (16, 4096, 4096),
                                   (1, 1000, 333), (32, 4096, 11008), (64, 12288, 4096), (48, 1000, 333)])
def test_gpu_bf16_launches_and_tuning(monkeypatch, M, N, K):
    """Every launch against a float64 product on the 7B projections' shapes (and an odd one); the
    tuner times them as CUDA-graph replays and the dispatcher then runs its choice."""
    tuner = LaunchTuner("skinny_linear")
    monkeypatch.setattr(sl, "_TUNER", tuner)
    g = torch.Generator(device="cuda").manual_seed(M + N)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).bfloat16()
    want = x.double() @ w.double().T
    errors = {}

    def checked(fn):
        errors[len(errors)] = ((fn().double() - want).norm() / want.norm()).item()
        return cuda_graph_ms(fn)
    key = (str(x.device), torch.bfloat16, sl.row_tile(M), N, K)   # the key skinny_linear looks up
    times = tuner.tune(key, sl.skinny_candidates(M, x.device), lambda c: sl.skinny_linear_run(x, w, c), checked)
    assert max(errors.values()) < 1e-2, errors
    assert all(0 < t < 5.0 for t in times.values()), times
    chosen = min(times, key=times.get)
    out = sl.skinny_linear(x, w)
    assert tuner.chosen[key] == chosen and list(tuner.times) == [key]    # dispatched, not tuned again
    assert ((out.double() - want).norm() / want.norm()).item() < 1e-2

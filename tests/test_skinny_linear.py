"""The decode GEMM kernel (skinny_linear.py): every tile the tuner may pick against a float64 oracle
(interpreter), split-K launches (every split counted once, in split order, empty splits included),
stream-K launches (every program count from 1 to one per unit; shared tiles combined in program
order), the dispatch rules, tuning on rotated weight copies, and on a GPU the bf16 launches, the
tuned choice and the split and stream-K launches' determinism. The same for the gate/up form with
SwiGLU in the epilogue (`skinny_linear_swiglu`) and the q/k/v form with rotary and the cache write
in it (`skinny_linear_rope`; both skinny_fused.py), which also give the unfused pairs' bits, and for
the residual add and RMSNorm in the prologue (skinny_norm.py)."""
import gc
import weakref

import pytest
import torch

from mtp_kernels import skinny_fused as sf, skinny_linear as sl, skinny_norm as sn
from mtp_kernels.arrival import arrival_counters
from mtp_kernels.launch_tuner import GRAPH_CALLS, LaunchTuner, close_to, cuda_graph_ms


def _inputs(M, N, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype)


def _patch_run(monkeypatch, run):
    """run in place of skinny_linear_run wherever it is called: the plain GEMM and the unfused pairs
    (skinny_linear.py), the epilogues (skinny_fused.py) and the norm prologue (skinny_norm.py)."""
    for module in (sl, sf, sn):
        monkeypatch.setattr(module, "skinny_linear_run", run)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 37, 33), (1, 64, 128), (3, 37, 96), (16, 48, 64), (7, 1, 5),
                                   (17, 37, 40), (32, 16, 48), (37, 21, 33), (64, 16, 16)])
def test_every_candidate_matches_the_oracle(triton_backend, dtype, M, N, K):
    x, w = _inputs(M, N, K, dtype, seed=M * 100 + N + K)
    want = x.double() @ w.double().T
    candidates = sl.skinny_candidates(M, x.device)
    assert candidates[0] is None and len(candidates) == {1: 7, 16: 7, 32: 5, 64: 5}[sl.row_tile(M)]
    assert all(c.block_m == max(16, sl.row_tile(M)) for c in candidates[1:] if c.use_dot)
    assert any(c.split_k > 1 for c in candidates[1:])   # every row tile tries a split-K launch
    assert any(c.stream_k for c in candidates[1:])      # and a stream-K one
    assert any(c.ws for c in candidates[1:]) == (M > 1)   # and, past one row, a warp-specialized one
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


def _nan_scratch(monkeypatch):
    """torch.empty fills with NaN: a split that never stores its partial (an empty one) shows."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out
    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.mark.parametrize("M,N,K,launch", [
    (2, 37, 40, sl.SkinnyLaunch(16, 16, True, 1, 1, 16, split_k=2)),    # 3 K tiles: 2 + 1
    (2, 37, 40, sl.SkinnyLaunch(32, 16, True, 1, 1, 16, split_k=4)),    # 1 + 1 + 1, the last split empty
    (17, 21, 33, sl.SkinnyLaunch(16, 16, True, 1, 1, 32, split_k=3)),   # K not a multiple of BLOCK_K
    (37, 37, 70, sl.SkinnyLaunch(16, 16, True, 1, 1, 64, split_k=4)),   # 5 K tiles: 2 + 2 + 1 + empty
    (64, 16, 16, sl.SkinnyLaunch(16, 16, True, 1, 1, 64, split_k=4)),   # one K tile, three empty splits
    (64, 50, 64, sl.SkinnyLaunch(16, 16, True, 1, 1, 64, split_k=2)),   # even K: 2 + 2
    # The warp-specialized tile: one K tile and three empty splits; 5 K tiles 2 + 2 + 1 + empty, swapped
    (64, 16, 16, sl.SkinnyLaunch(16, 16, True, 4, 1, 64, split_k=4, ws=True)),
    (37, 37, 72, sl.SkinnyLaunch(16, 16, True, 4, 1, 64, split_k=4, ws=True, swap_ab=True)),
])
def test_split_k_launches_match_the_oracle_and_leave_the_counters_at_zero(triton_backend, monkeypatch, M, N, K, launch):
    _nan_scratch(monkeypatch)
    x, w = _inputs(M, N, K, torch.float32, seed=M + N + K)
    assert not launch.ws or sl.tma_layout_ok(x, w)   # the kernel runs, not the unfused fallback
    want = x.double() @ w.double().T
    first = sl.skinny_linear_run(x, w, launch)
    torch.testing.assert_close(first.double(), want, rtol=1e-5, atol=1e-4)
    assert int(arrival_counters(x.device, -(-N // launch.block_n)).abs().sum()) == 0
    assert torch.equal(sl.skinny_linear_run(x, w, launch), first)   # the counters were reset for it


def test_split_k_adds_the_partials_in_split_order(triton_backend, monkeypatch):
    """One K tile per split, with partials 2^24, 1, -2^24, 1 in output 0: float32 gives 1 in split
    order (2^24 + 1 rounds to 2^24), 2 in reverse order and 0 if the combining split (the last)
    started from its own partial; a missed split gives something else again. The other outputs
    are integers, exact in any order."""
    _nan_scratch(monkeypatch)
    M, N, K, block_k, split = 2, 3, 64, 16, 4
    x = torch.ones(M, K)
    w = torch.zeros(N, K)
    w[0, [0, 16, 32, 48]] = torch.tensor([2.0 ** 24, 1.0, -2.0 ** 24, 1.0])
    w[1, :] = torch.arange(K) % 7 - 3
    w[2, 5::16] = torch.tensor([1.0, 2.0, 4.0, 8.0])
    launch = sl.SkinnyLaunch(16, block_k, True, 1, 1, 16, split_k=split)
    y = sl.skinny_linear_run(x, w, launch)
    in_order = torch.zeros((), dtype=torch.float32)
    for s in range(split):
        in_order = in_order + (x[0, s * block_k:(s + 1) * block_k] @ w[0, s * block_k:(s + 1) * block_k])
    assert float(in_order) == 1.0
    assert y[:, 0].tolist() == [1.0, 1.0]
    assert y[:, 1:].tolist() == [[float(w[1].sum()), 15.0]] * M


def _stream_k_ranges(units: int, programs: int) -> list:
    """Each program's unit range, as the kernel cuts them."""
    return [(p * units // programs, (p + 1) * units // programs) for p in range(programs)]


@pytest.mark.parametrize("M,N,K,block_n,block_k,block_m", [
    (2, 37, 40, 16, 16, 16),    # 3 n tiles (the last ragged) x 3 k tiles (the last ragged)
    (17, 21, 33, 16, 16, 32),   # K not a multiple of BLOCK_K, rows not a multiple of the row tile
    (64, 50, 64, 16, 16, 64),   # a full 64-row tile, 4 x 4 units
    (5, 64, 128, 32, 32, 16),   # even N and K: the unmasked loads
    (1, 7, 5, 16, 16, 16),      # one unit
    (3, 16, 160, 16, 16, 16),   # one n tile of 10 k tiles: every program shares it
])
def test_stream_k_launches_match_the_oracle_at_every_program_count(triton_backend, monkeypatch, M, N, K,
                                                                    block_n, block_k, block_m):
    """From one program (every tile whole) to one program per unit (every k tile a partial), and
    more programs than units (capped); counters back at zero after each launch."""
    _nan_scratch(monkeypatch)
    x, w = _inputs(M, N, K, torch.float32, seed=M + N + K)
    want = x.double() @ w.double().T
    units = -(-N // block_n) * -(-K // block_k)
    launch = sl.SkinnyLaunch(block_n, block_k, True, 1, 1, block_m, stream_k=1)
    counts = sorted({1, 2, 3, 5, 7, units, units + 3})
    shared_somewhere = False
    for programs in counts:
        y = sl.skinny_linear_run(x, w, launch, programs=programs)
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4, msg=lambda m: f"{programs} programs: {m}")
        assert int(arrival_counters(x.device, -(-N // block_n)).abs().sum()) == 0, programs
        ranges = _stream_k_ranges(units, min(programs, units))
        shared_somewhere |= any(lo % (-(-K // block_k)) or hi - lo < -(-K // block_k) for lo, hi in ranges)
    assert shared_somewhere or units == 1   # the shapes do exercise the shared-tile combine


def test_stream_k_adds_a_shared_tile_in_program_order(triton_backend, monkeypatch):
    """One n tile of 4 k tiles, one per program, with partials 2^24, 1, -2^24, 1 in output 0:
    float32 gives 1 only in program order (see the split-K test), whichever program arrives last;
    a program whose partial went to the wrong slot or was missed gives something else."""
    _nan_scratch(monkeypatch)
    M, N, K, block_k = 2, 3, 64, 16
    x = torch.ones(M, K)
    w = torch.zeros(N, K)
    w[0, [0, 16, 32, 48]] = torch.tensor([2.0 ** 24, 1.0, -2.0 ** 24, 1.0])
    w[1, :] = torch.arange(K) % 7 - 3
    w[2, 5::16] = torch.tensor([1.0, 2.0, 4.0, 8.0])
    launch = sl.SkinnyLaunch(16, block_k, True, 1, 1, 16, stream_k=1)
    for programs in (4, 3):   # 4: one k tile each; 3: ranges 1 + 1 + 2 units (the last program's 2 summed first)
        y = sl.skinny_linear_run(x, w, launch, programs=programs)
        assert y[:, 0].tolist() == [1.0, 1.0], programs
        assert y[:, 1:].tolist() == [[float(w[1].sum()), 15.0]] * M, programs


def test_stream_k_ranges_and_the_program_count():
    """The kernel's ranges cover every unit once; a tile's sharers are the programs the kernel's own
    _owner names (its Python body: integer arithmetic only); the GPU count is per_sm x the SMs."""
    for units in range(1, 40):
        for programs in range(1, units + 1):
            ranges = _stream_k_ranges(units, programs)
            assert ranges[0][0] == 0 and ranges[-1][1] == units
            assert all(lo < hi for lo, hi in ranges) and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            for unit in range(units):
                owner = sl._owner.fn(unit, units, programs)
                assert ranges[owner][0] <= unit < ranges[owner][1]
    cpu = torch.device("cpu")
    assert sl.stream_k_programs(cpu, 2) == 6   # the interpreter's 3 stand-in SMs


def test_stream_k_programs_on_a_gpu_are_per_sm(monkeypatch):
    monkeypatch.setenv("MTP_CROSS_COMPILE", "90")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert sl.stream_k_programs(torch.device("cpu"), 2) == 264   # the cross-compile's 132 SMs


def test_split_k_launch_rules_and_labels():
    x, w = torch.randn(2, 24), torch.randn(40, 24)
    with pytest.raises(ValueError, match="split_k=2 needs .* a tl.dot launch"):
        sl.skinny_linear_run(x[:1], w, sl.SkinnyLaunch(16, 32, use_dot=False, split_k=2))
    with pytest.raises(ValueError, match="split_k=0 needs split_k >= 1"):
        sl.skinny_linear_run(x, w, sl.SkinnyLaunch(16, 32, use_dot=True, split_k=0))
    with pytest.raises(ValueError, match="stream_k=1 needs .* an unsplit tl.dot launch"):
        sl.skinny_linear_run(x, w, sl.SkinnyLaunch(16, 32, use_dot=True, split_k=2, stream_k=1))
    with pytest.raises(ValueError, match="stream_k=1 needs .* an unsplit tl.dot launch"):
        sl.skinny_linear_run(x[:1], w, sl.SkinnyLaunch(16, 32, use_dot=False, stream_k=1))
    assert sl.SkinnyLaunch(128, 64, True, 8, 4, 64, split_k=4).label() == "64x128x64 dot w8 s4 k4"
    assert sl.SkinnyLaunch(256, 64, True, 8, 3, 64, stream_k=1).label() == "64x256x64 dot w8 s3 sk1"
    assert sl.SkinnyLaunch(32, 128, True, 4, 4, 64).label() == "64x32x128 dot w4 s4"
    assert sl.SkinnyLaunch(8, 1024, False, 4, 3).label() == "1x8x1024 fma w4 s3"


def test_gpu_candidates_split_k_per_row_tile(monkeypatch):
    """The sm_90 tables: 3-4 split-K tiles per tl.dot row tile, none on multiply-add launches, and
    1-3 stream-K tiles at least 128 wide."""
    monkeypatch.setenv("MTP_CROSS_COMPILE", "90")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = torch.device("cpu")
    for M in (1, 16, 32, 64):
        launches = sl.skinny_candidates(M, cpu)[1:]
        split = [c for c in launches if c.split_k > 1 and not c.ws]
        assert 3 <= len(split) <= 4 and all(c.use_dot and c.split_k in (2, 4) for c in split)
        assert all(c.block_m == max(16, sl.row_tile(M)) for c in split)
        assert len(set(launches)) == len(launches)
        stream = [c for c in launches if c.stream_k]
        assert 1 <= len(stream) <= 3 and all(c.use_dot and c.split_k == 1 and c.block_n >= 128 for c in stream)


def test_gpu_candidates_warp_specialized_tiles(monkeypatch):
    """The sm_90 tables offer warp-specialized tiles at 32 and 64 rows only (16 rows and one row
    read near their bytes' time already), 4 warps each; swapped where x's rows are too few for
    wgmma's M of 64. On a GPU they are offered only as `skinny_ws_allowed` says: with
    MTP_SKINNY_WS=1 on Hopper, never with 0, never off Hopper, and not by default until a Triton
    version is validated."""
    monkeypatch.setenv("MTP_CROSS_COMPILE", "90")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = torch.device("cpu")
    for M in (1, 16, 32, 64):
        ws = [c for c in sl.skinny_candidates(M, cpu)[1:] if c.ws]
        assert len(ws) == (3 if M in (32, 64) else 0)
        assert all(c.use_dot and not c.stream_k and c.num_warps == 4 and c.block_m == M for c in ws)
        assert all(c.swap_ab == (M < 64) for c in ws[:2])
        assert all(c.block_n >= 64 for c in ws if c.swap_ab)
    monkeypatch.setenv("MTP_CROSS_COMPILE", "100")
    assert not any(c.ws for c in sl.skinny_candidates(64, cpu)[1:])
    monkeypatch.delenv("MTP_CROSS_COMPILE")
    from mtp_kernels import skinny_ws
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda", 0)
    for major, setting, validated, offered in ((9, "1", (), True), (9, "0", (), False), (9, "", (), False),
                                               (9, "", ("",), True), (9, "0", ("",), False), (10, "1", (), False),
                                               (8, "1", (), False)):
        monkeypatch.setattr(skinny_ws, "compute_major", lambda index, major=major: major)
        monkeypatch.setattr(skinny_ws, "SKINNY_WS_VALIDATED_TRITON", validated)
        monkeypatch.setenv("MTP_SKINNY_WS", setting)
        assert skinny_ws.skinny_ws_allowed(cuda) == offered, (major, setting, validated)
    assert not skinny_ws.skinny_ws_allowed(cpu)
    # A list of tile ids (gpu_check.sh: the tiles whose GPU test passed) offers those only.
    monkeypatch.setattr(skinny_ws, "compute_major", lambda index: 9)
    monkeypatch.setenv("MTP_CROSS_COMPILE", "90")
    monkeypatch.setenv("MTP_SKINNY_WS", "1")
    every = [c for c in sl.skinny_candidates(64, cpu)[1:] if c.ws]
    monkeypatch.setenv("MTP_SKINNY_WS", f"{every[1].tile_id()}, {every[2].tile_id()}")
    assert [c for c in sl.skinny_candidates(64, cpu)[1:] if c.ws] == every[1:]
    assert every[1].tile_id() == every[1].label().replace(" ", "_") and " " not in every[1].tile_id()
    monkeypatch.delenv("MTP_CROSS_COMPILE")
    assert skinny_ws.skinny_ws_allowed(cuda)


def test_warp_specialized_launch_rules_twins_and_labels(triton_backend, monkeypatch):
    """A warp-specialized launch is an unstreamed tl.dot launch and takes no norm prologue; its
    SwiGLU and rotary twins halve its width where wgmma's M allows (swapped: 64 rows of weight at
    least), else keep it and drop stages to fit their two weight tiles per K step."""
    x, w = torch.randn(2, 24), torch.randn(40, 24)
    with pytest.raises(ValueError, match="warp-specialized launch is an unstreamed tl.dot launch"):
        sl.skinny_linear_run(x, w, sl.SkinnyLaunch(16, 32, True, stream_k=1, ws=True))
    with pytest.raises(ValueError, match="warp-specialized launch is an unstreamed tl.dot launch"):
        sl.skinny_linear_run(x[:1], w, sl.SkinnyLaunch(16, 32, False, ws=True))
    norm = sn.NormPrologue(torch.ones(24), 1e-5)
    with pytest.raises(ValueError, match="norm prologue needs an unsplit kernel launch"):
        sl.skinny_linear_run(x, w, sl.SkinnyLaunch(16, 32, True, ws=True), norm=norm)
    assert sl.SkinnyLaunch(64, 128, True, 4, 4, 32, ws=True, swap_ab=True).label() == "32x64x128 dot w4 s4 ws swap"
    assert sl.SkinnyLaunch(64, 128, True, 4, 3, 64, 2, ws=True).label() == "64x64x128 dot w4 s3 k2 ws"
    assert sf.swiglu_twin(sl.SkinnyLaunch(128, 128, True, 4, 3, 64, ws=True, swap_ab=True)).block_n == 64
    assert sf.swiglu_twin(sl.SkinnyLaunch(64, 128, True, 4, 4, 64, ws=True)).block_n == 32
    kept = sf.swiglu_twin(sl.SkinnyLaunch(64, 128, True, 4, 6, 64, ws=True, swap_ab=True))
    assert (kept.block_n, kept.num_stages) == (64, 4)    # (64 + 2 x 64) x 128 x 2 = 48 KB a stage: 4 in 200 KB
    assert sf.ws_paired_stages(sl.SkinnyLaunch(256, 256, True, 4, 4, 64, ws=True)) == 2
    assert sf.rope_twin(kept) == sf.swiglu_twin(kept)
    monkeypatch.setenv("MTP_CROSS_COMPILE", "90")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = torch.device("cpu")
    for M in (32, 64):
        assert any(c.ws for c in sf.swiglu_candidates(M, cpu)[1:])
        assert not any(c.ws for c in sn.norm_candidates(M, cpu, None, sf.swiglu_candidates)[1:])


def test_warp_specialized_tiles_leave_layouts_tma_cannot_read_to_the_unfused_launch(triton_backend, monkeypatch):
    """TMA needs 16-byte aligned bases and row strides: x and weight rows of 37 halves (74 bytes)
    or a base 2 bytes past an aligned one go to the unfused launch (F.linear here), never into the
    kernel; an aligned layout does launch it."""
    launched = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launched.append(grid)
            return self.kernel[grid]
    monkeypatch.setattr(sl, "skinny_ws_kernel", Recorder(sl.skinny_ws_kernel))
    launch = sl.SkinnyLaunch(16, 16, True, 4, 1, 16, ws=True, swap_ab=True)
    x, w = _inputs(3, 20, 37, torch.float16, seed=7)
    torch.testing.assert_close(sl.skinny_linear_run(x, w, launch), x @ w.T)
    wide = torch.zeros(21, 40, dtype=torch.float16)
    wide.view(-1)[1:1 + 20 * 40].view(20, 40).copy_(torch.randn(20, 40).half())
    shifted = wide.view(-1)[1:1 + 20 * 40].view(20, 40)     # rows 80 bytes apart, the base 2 bytes off
    x40 = torch.randn(3, 40).half()
    assert not sl.tma_layout_ok(x40, shifted) and sl.tma_layout_ok(x40, shifted.clone())
    torch.testing.assert_close(sl.skinny_linear_run(x40, shifted, launch), x40 @ shifted.T)
    assert launched == []
    torch.testing.assert_close(sl.skinny_linear_run(x40, shifted.clone(), launch).float(),
                               (x40.double() @ shifted.double().T).float(), rtol=2e-3, atol=5e-3)
    assert len(launched) == 1


def test_tuners_leave_out_a_launch_whose_results_disagree(triton_backend, monkeypatch):
    """A launch that computes wrong values (here: one tile's output 5% off, another's with a NaN)
    never wins on speed: tune_skinny runs every candidate once against F.linear and counts one that
    disagrees as infinitely slow, with a warning, even where it times fastest. (The epilogue and
    norm tuners pass the same check their unfused pair's result; not exercised here.)"""
    x, w = _inputs(3, 40, 24, torch.float32, seed=11)
    candidates = sl.skinny_candidates(3, x.device)
    bad, nan = candidates[1], candidates[2]
    run, launched = sl.skinny_linear_run, []

    def faulty(x2, weight, launch, *args, **kwargs):
        launched.append(launch)
        y = run(x2, weight, launch, *args, **kwargs)
        if launch == bad:
            return y * 1.05
        if launch == nan:
            y = y.clone()
            y[0, 0] = float("nan")
        return y

    def timer(fn):   # the faulty launches would time fastest
        fn()
        return 0.001 if launched[-1] in (bad, nan) else 1.0
    monkeypatch.setattr(sl, "skinny_linear_run", faulty)
    monkeypatch.setattr(sl, "_TUNER", LaunchTuner("skinny_linear"))
    key = ("cpu", torch.float32, 16, 40, 24)
    with pytest.warns(UserWarning, match="disagree with the reference"):
        times = sl.tune_skinny(key, x, w, timer)
    assert times[bad] == times[nan] == float("inf")
    assert all(t == 1.0 for c, t in times.items() if c not in (bad, nan)) and sl._TUNER.chosen[key] not in (bad, nan)
    # close_to: finite and within rtol in norm, whatever the shape.
    ref = torch.tensor([[3.0, 4.0]])
    agrees = close_to(ref)
    assert agrees(torch.tensor([3.0, 4.04])) and not agrees(torch.tensor([3.0, 4.1]))
    assert not agrees(torch.tensor([3.0, float("nan")])) and close_to(torch.zeros(3))(torch.zeros(1, 3))


def test_tuning_leaves_out_warp_specialized_tiles_on_a_layout_tma_cannot_read(triton_backend, monkeypatch):
    """x rows that start off TMA's 16-byte alignment: a warp-specialized tile would run as the unfused
    launch there, so it is not timed (under its own name) for the key; on aligned rows it is."""
    x, w = _inputs(3, 40, 24, torch.float32, seed=12)
    shifted = torch.empty(3 * 24 + 1)[1:].view(3, 24).copy_(x)     # 4 bytes off a 16-byte boundary
    assert not sl.tma_layout_ok(shifted, w) and sl.tma_layout_ok(x, w)
    assert any(c.ws for c in sl.tuned_candidates(3, x.device)[1:])
    for operand, with_ws in ((shifted, False), (x, True)):
        monkeypatch.setattr(sl, "_TUNER", LaunchTuner("skinny_linear"))
        times = sl.tune_skinny(("cpu", torch.float32, 16, 40, 24), operand, w, timer=lambda fn: (fn(), 1.0)[1])
        assert any(getattr(c, "ws", False) for c in times) == with_ws
        assert all(c in sl.tuned_candidates(3, x.device) for c in times)


def test_tuning_reads_a_rotating_copy_of_the_weight(triton_backend, monkeypatch):
    """tune_skinny times every candidate on weight copies that hold twice the L2 (given here), the
    next copy at each call, and frees the copies when it returns."""
    tuner = LaunchTuner("skinny_linear")
    monkeypatch.setattr(sl, "_TUNER", tuner)
    x, w = _inputs(3, 40, 24, torch.float32, seed=7)
    nbytes = w.numel() * w.element_size()
    used, refs = [], {}
    run = sl.skinny_linear_run

    def recording_run(a, b, c):
        used.append(b.data_ptr())
        refs.setdefault(b.data_ptr(), weakref.ref(b))
        assert torch.equal(b, w)
        return run(a, b, c)
    monkeypatch.setattr(sl, "skinny_linear_run", recording_run)

    def timer(fn):   # as cuda_graph_ms: a call outside the capture, then GRAPH_CALLS captured
        for _ in range(1 + GRAPH_CALLS):
            torch.testing.assert_close(fn(), x @ w.T, rtol=1e-5, atol=1e-4)
        return 1.0
    key = ("cpu", torch.float32, 16, 40, 24)
    times = sl.tune_skinny(key, x, w, timer, l2_bytes=2 * nbytes)    # 4 copies' worth -> 5 (divides 10)
    assert list(times) == sl.skinny_candidates(3, x.device) and tuner.chosen[key] is None
    assert len(set(used)) == 5 and w.data_ptr() in used
    assert all(a != b for a, b in zip(used, used[1:]))                 # no call reads the copy of the one before
    assert used == (used[:5] * len(used))[:len(used)]                  # in a fixed cycle
    gc.collect()
    assert [p for p, ref in refs.items() if ref() is not None] == [w.data_ptr()]   # the clones are freed
    used.clear()
    sl.tune_skinny(key, x, w, timer, l2_bytes=nbytes // 4)             # larger than twice the L2: no copy
    assert set(used) == {w.data_ptr()}


def test_cublaslt_is_timed_beside_cublas_on_cuda_only():
    """The tuner's candidates: cuBLAS (None), cuBLASLt on a CUDA device only (a CPU build refuses the
    switch), then the kernel tiles unchanged."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sl.blas_candidates(cpu) == [] and sl.tuned_candidates(3, cpu) == sl.skinny_candidates(3, cpu)
    tuned = sl.tuned_candidates(3, cuda)
    assert tuned[:2] == [None, sl.BlasLaunch("cublaslt")] and tuned[2:] == sl.skinny_candidates(3, cuda)[1:]
    assert sl.BlasLaunch("cublaslt").label() == "cuBLASLt"


@pytest.fixture
def fake_blas_switch(monkeypatch):
    """torch's preferred-BLAS switch as a plain variable (the CPU build refuses 'cublaslt'), and
    reference.skinny_linear recording the library preferred at each call."""
    state = {"library": "default", "seen": []}

    def preferred(backend=None):
        if backend is not None:
            state["library"] = backend
        return state["library"]

    linear = sl.reference.skinny_linear

    def recording_linear(x, w):
        state["seen"].append(state["library"])
        return linear(x, w)
    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", preferred)
    monkeypatch.setattr(sl.reference, "skinny_linear", recording_linear)
    return state


def test_blas_launch_prefers_its_library_for_its_call_only(fake_blas_switch, monkeypatch):
    x, w = _inputs(3, 5, 8, torch.float32, seed=11)
    y = sl.skinny_linear_run(x, w, sl.BlasLaunch("cublaslt"))
    torch.testing.assert_close(y, x @ w.T)
    assert fake_blas_switch["seen"] == ["cublaslt"] and fake_blas_switch["library"] == "default"

    def missing(x, w):
        raise RuntimeError("Cannot set preferred backend to cuBLASLt")
    monkeypatch.setattr(sl.reference, "skinny_linear", missing)
    with pytest.raises(RuntimeError, match="cuBLASLt"):        # a tuner counts this launch out
        sl.skinny_linear_run(x, w, sl.BlasLaunch("cublaslt"))
    assert fake_blas_switch["library"] == "default"           # restored all the same
    with pytest.raises(ValueError, match="cuBLASLt has no epilogue"):
        sl.skinny_linear_run(x, torch.randn(10, 8), sl.BlasLaunch("cublaslt"), swiglu=True)


def test_tuner_keeps_cublaslt_where_it_times_fastest(triton_backend, fake_blas_switch, monkeypatch):
    """With cuBLASLt offered and timed fastest, the tuner keeps it, and the launch of that shape
    (also the unfused pair of the SwiGLU epilogue's tuner) runs F.linear with cuBLASLt preferred."""
    tuner = LaunchTuner("skinny_linear")
    monkeypatch.setattr(sl, "_TUNER", tuner)
    monkeypatch.setattr(sl, "blas_candidates", lambda device: [sl.BlasLaunch("cublaslt")])
    x, w = _inputs(3, 40, 24, torch.float32, seed=7)
    calls = iter(range(1000))

    def timer(fn):   # the second candidate (cuBLASLt) is the fastest
        fn()
        return 0.5 if next(calls) == 1 else 1.0
    key = ("cpu", torch.float32, 16, 40, 24)
    times = sl.tune_skinny(key, x, w, timer)
    assert list(times)[:2] == [None, sl.BlasLaunch("cublaslt")] and tuner.chosen[key] == sl.BlasLaunch("cublaslt")
    fake_blas_switch["seen"].clear()
    launch = tuner.choose(key, x.device, lambda: None, lambda: None)
    torch.testing.assert_close(sl.skinny_linear_run(x, w, launch), x @ w.T)
    assert fake_blas_switch["seen"] == ["cublaslt"]
    gate, up = (x @ w.T).chunk(2, dim=-1)
    torch.testing.assert_close(sl._unfused_swiglu(x, w), torch.nn.functional.silu(gate) * up)
    assert fake_blas_switch["seen"] == ["cublaslt"] * 2


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
    """Every launch (split-K ones included) against a float64 product on the 7B projections' shapes
    (and an odd one); the tuner times them as CUDA-graph replays on rotated weight copies and the
    dispatcher then runs its choice."""
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
    times = sl.tune_skinny(key, x, w, checked)
    tiles = [c for c in times if isinstance(c, sl.SkinnyLaunch)]
    # (K = 333: bf16 rows TMA cannot read, so the warp-specialized tiles, where offered, sit this one out)
    assert list(times) == sl._run_as_themselves(sl.tuned_candidates(M, x.device), x, w)
    assert sl.BlasLaunch("cublaslt") in times
    assert any(c.split_k > 1 for c in tiles) and any(c.stream_k for c in tiles)
    assert max(errors.values()) < 1e-2, errors
    assert all(0 < t < 5.0 for t in times.values()), times
    chosen = min(times, key=times.get)
    out = sl.skinny_linear(x, w)
    assert tuner.chosen[key] == chosen and list(tuner.times) == [key]    # dispatched, not tuned again
    assert ((out.double() - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(64, 4096, 4096), (64, 22016, 4096), (16, 4096, 11008), (1, 12288, 4096),
                                   (48, 1000, 333), (32, 4096, 11008)])
def test_gpu_split_k_launches_are_deterministic(M, N, K):
    """Hundreds of programs race for the arrival counters: every split-K and stream-K launch gives
    the same bits at every run (the partials are added in split or program order, whichever program
    arrives last), inside a CUDA graph too, and leaves its counters at zero."""
    g = torch.Generator(device="cuda").manual_seed(M * N)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).bfloat16()
    want = x.double() @ w.double().T
    for launch in [c for c in sl.skinny_candidates(M, x.device)[1:] if c.split_k > 1 or c.stream_k]:
        first = sl.skinny_linear_run(x, w, launch)
        assert ((first.double() - want).norm() / want.norm()).item() < 1e-2, launch
        for _ in range(10):
            assert torch.equal(sl.skinny_linear_run(x, w, launch), first), launch
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            outs = [sl.skinny_linear_run(x, w, launch) for _ in range(3)]
        torch.cuda.current_stream().wait_stream(stream)
        for _ in range(3):
            graph.replay()
            assert all(torch.equal(out, first) for out in outs), launch
        torch.cuda.synchronize()
        assert int(arrival_counters(x.device, 1).abs().sum()) == 0, launch


def _assert_same_bits(fused, unfused, launch):
    """Equal bits, except for a swapped warp-specialized tile in float32 under the interpreter: it
    forms each K step by numpy's matmul of (weight rows, K) by (K, x rows), whose float32 result for
    one weight row depends on where in the tile that row sits (BLAS's edge kernels), and the fused
    and unfused launches place a gate or pair row differently. There: within a few ulps of the
    largest value (a sum's rounding error scales with its terms, not with the sum)."""
    if launch.ws and launch.swap_ab and fused.dtype == torch.float32:
        scale = float(unfused.abs().max())
        torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=4e-7 * scale, msg=lambda m: f"{launch}: {m}")
    else:
        assert torch.equal(fused, unfused), launch


# ------------------------------------------------------------------ SwiGLU in the epilogue
def _swiglu_inputs(M, F, K, dtype, seed, gate_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w13 = torch.randn(2 * F, K, generator=g) * K ** -0.5
    w13[:F] *= gate_scale
    return x.to(dtype), w13.to(dtype)


def _swiglu_oracle(x, w13):
    gate, up = (x.double() @ w13.double().T).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,F,K", [(1, 37, 33), (1, 64, 128), (3, 37, 96), (17, 21, 33), (37, 21, 40),
                                   (64, 16, 16), (5, 1, 5)])
def test_every_swiglu_candidate_matches_the_oracle(triton_backend, dtype, M, F, K):
    """silu(x @ w1^T) * (x @ w3^T) from every launch the SwiGLU tuner may pick (the unfused pair
    first), odd F and K, every row tile, against float64."""
    x, w13 = _swiglu_inputs(M, F, K, dtype, seed=M * 100 + F + K)
    want = _swiglu_oracle(x, w13)
    candidates = sf.swiglu_candidates(M, x.device)
    assert candidates[0] is None and any(c.split_k > 1 for c in candidates[1:]) and any(c.stream_k for c in candidates[1:])
    for launch in candidates:
        y = sl.skinny_linear_run(x, w13, launch, swiglu=True)
        assert y.shape == (M, F) and y.dtype == dtype
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=4e-3, atol=2e-3)
        torch.testing.assert_close(y.double(), want, **tol, msg=lambda m: f"{launch}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,F,K,gate_scale", [(1, 37, 33, 1.0), (3, 37, 96, 1.0), (17, 21, 33, 1.0),
                                              (64, 16, 16, 1.0), (2, 24, 64, 400.0)])
def test_swiglu_epilogue_gives_the_unfused_pair_bits(triton_backend, monkeypatch, dtype, M, F, K, gate_scale):
    """The same tile run plain over w13 and then the swiglu kernel, against the tile with SwiGLU in
    its epilogue: the same bits (both round each product to the dtype, then silu, then the product),
    split-K partials (NaN scratch: a missed one shows) and one-program stream-K launches included.
    gate_scale 400: gates of +-hundreds, where exp overflows unless sigmoid is taken from its small side."""
    _nan_scratch(monkeypatch)
    from mtp_kernels.swiglu import swiglu

    x, w13 = _swiglu_inputs(M, F, K, dtype, seed=M + F + K, gate_scale=gate_scale)
    for launch in sf.swiglu_candidates(M, x.device)[1:]:
        programs = 1 if launch.stream_k else None   # several programs cut the two GEMMs' units apart differently
        gate, up = sl.skinny_linear_run(x, w13, launch, programs=programs).chunk(2, dim=-1)
        fused = sl.skinny_linear_run(x, w13, launch, programs=programs, swiglu=True)
        assert torch.isfinite(fused).all(), launch
        _assert_same_bits(fused, swiglu(gate, up), launch)
    if gate_scale > 1:
        assert x.double().matmul(w13[:F].double().T).abs().max() > 100   # the large gates were there


@pytest.mark.parametrize("M,F,K,block_n,block_k,block_m", [
    (2, 37, 40, 16, 16, 16),    # 3 n tiles (the last ragged) x 3 k tiles (the last ragged)
    (17, 21, 33, 16, 16, 32),   # K not a multiple of BLOCK_K
    (3, 16, 160, 16, 16, 16),   # one n tile of 10 k tiles: every program shares it
])
def test_swiglu_stream_k_launches_at_every_program_count(triton_backend, monkeypatch, M, F, K, block_n, block_k,
                                                         block_m):
    """Shared tiles carry both halves' partials (gate and up) to the merge; counters back at zero."""
    _nan_scratch(monkeypatch)
    x, w13 = _swiglu_inputs(M, F, K, torch.float32, seed=M + F + K)
    want = _swiglu_oracle(x, w13)
    units = -(-F // block_n) * -(-K // block_k)
    launch = sl.SkinnyLaunch(block_n, block_k, True, 1, 1, block_m, stream_k=1)
    for programs in sorted({1, 2, 3, 5, 7, units}):
        y = sl.skinny_linear_run(x, w13, launch, programs=programs, swiglu=True)
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{programs} programs: {m}")
        assert int(arrival_counters(x.device, -(-F // block_n)).abs().sum()) == 0, programs


def test_swiglu_candidates_are_the_twins_of_the_fastest_plain_tiles(monkeypatch):
    """On the sm_90 tables each SwiGLU tile is a plain tile at half the width (16 at least for
    tl.dot, 4 for multiply-add), so a program's weight bytes per K step stay the plain tile's.
    Untimed: every plain tile's twin. With the plain tuner's times for the fused weight: the twins of
    its 3 fastest kernel tiles, fastest first (cuBLAS and launches that failed left out)."""
    monkeypatch.setenv("MTP_CROSS_COMPILE", "90")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = torch.device("cpu")
    for M in (1, 16, 32, 64):
        plain = sl.skinny_candidates(M, cpu)
        fused = sf.swiglu_candidates(M, cpu)
        assert fused[0] is None and len(set(fused)) == len(fused) == len(plain)   # no two twins alike here
        assert fused[1:] == [sl.SkinnyLaunch(max(c.block_n // 2, 16 if c.use_dot else 4), c.block_k, c.use_dot,
                                             c.num_warps, c.num_stages, c.block_m, c.split_k, c.stream_k)
                             if not c.ws else sf.swiglu_twin(c) for c in plain[1:]]
        times = {c: float(i) for i, c in enumerate(reversed(plain))}   # the last tile the fastest
        times[None] = -1.0                                              # cuBLAS is no tile to pair
        times[plain[-1]] = float("inf")                                 # a launch that failed
        kept = sf.swiglu_candidates(M, cpu, times)
        assert kept == [None] + [sf.swiglu_twin(c) for c in (plain[-2], plain[-3], plain[-4])]
        assert sf.swiglu_candidates(M, cpu, {None: 1.0}) == fused      # nothing timed: every twin
    assert sf.swiglu_twin(sl.SkinnyLaunch(16, 256, True, block_m=64)).block_n == 16
    assert sf.swiglu_twin(sl.SkinnyLaunch(8, 1024, False)).block_n == 4


def test_swiglu_dispatch_rules_and_errors(triton_backend, monkeypatch):
    """Untuned (a CPU tensor is never tuned): the unfused pair; a chosen tile runs; autograd gets the
    eager pair and its gradients; too many rows the unfused pair; a bad weight a clear error."""
    tuner = LaunchTuner("skinny_linear_swiglu")
    monkeypatch.setattr(sf, "_SWIGLU_TUNER", tuner)
    x, w13 = _swiglu_inputs(3, 20, 24, torch.float32, seed=9)
    x3 = x.view(1, 3, 24)
    want = _swiglu_oracle(x, w13).view(1, 3, 20)
    used = []
    run = sl.skinny_linear_run
    _patch_run(monkeypatch, lambda *a, **k: used.append((a[2], k.get("swiglu"))) or run(*a, **k))
    torch.testing.assert_close(sf.skinny_linear_swiglu(x3, w13).double(), want, rtol=1e-5, atol=1e-5)
    assert used == [(None, True), (None, None)]   # the pair: skinny_linear's own (untuned: cuBLAS's stand-in)
    launch = sl.SkinnyLaunch(16, 16, True, 1, 1, 16, split_k=2)
    tuner.chosen[("cpu", torch.float32, 16, 40, 24)] = launch
    used.clear()
    out = sf.skinny_linear_swiglu(x3, w13)
    assert used == [(launch, True)] and out.shape == (1, 3, 20)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    used.clear()
    big = torch.randn(65, 24)
    torch.testing.assert_close(sf.skinny_linear_swiglu(big, w13).double(), _swiglu_oracle(big, w13), rtol=1e-5, atol=1e-5)
    wg = w13.clone().requires_grad_()
    sf.skinny_linear_swiglu(x3, wg).sum().backward()
    wd = w13.double().requires_grad_()
    _swiglu_oracle(x, wd).sum().backward()
    torch.testing.assert_close(wg.grad.double(), wd.grad, rtol=1e-4, atol=1e-5)
    assert used == []
    for bad, why in ((torch.randn(41, 24), r"\(2F, K\) gate/up weight, got shape \(41, 24\)"),
                     (torch.randn(40, 23), r"K = x's last dim 24, got shape \(40, 23\)"),
                     (torch.randn(40), r"got shape \(40,\)")):
        with pytest.raises(ValueError, match=why):
            sf.skinny_linear_swiglu(x3, bad)
    with pytest.raises(ValueError, match=r"SwiGLU launch takes a \(2F, K\) gate/up weight, got \(41, 24\)"):
        run(x, torch.randn(41, 24), launch, swiglu=True)


@pytest.mark.parametrize("fn", [sl.skinny_linear, sf.skinny_linear_swiglu])
def test_operand_errors_name_the_problem(fn):
    """Before F.linear's or a kernel's own message from deep inside; autocast keeps its mixed dtypes."""
    x, w = torch.randn(3, 8), torch.randn(6, 8)
    for bad_x, bad_w, why in ((x, torch.randn(6, 7), r"K = x's last dim 8, got shape \(6, 7\)"),
                              (x, torch.randn(2, 6, 8), r"got shape \(2, 6, 8\)"),
                              (torch.tensor(1.0), w, r"x must be a floating tensor \(\.\.\., K\), got \(\) "),
                              (x.long(), w, "x must be a floating tensor"),
                              (x, w.double(), r"x \(torch.float32\) and weight \(torch.float64\) must share a dtype"),
                              (x.to("meta"), w, "one device")):
        with pytest.raises(ValueError, match=why):
            fn(bad_x, bad_w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fn(x.bfloat16(), w).dtype == torch.bfloat16


def test_swiglu_on_the_reference_path_is_the_reference_twin(monkeypatch):
    """CPU tensors on the reference backend: the twin in reference.py (F.linear, then silu * up,
    each rounded to the dtype), with autograd; no launch."""
    from mtp_kernels import reference

    monkeypatch.setenv("MTP_BACKEND", "reference")
    _patch_run(monkeypatch, lambda *a, **k: pytest.fail("launched"))
    x, w13 = _swiglu_inputs(4, 10, 12, torch.bfloat16, seed=2)
    gate, up = torch.nn.functional.linear(x, w13).chunk(2, dim=-1)
    torch.testing.assert_close(sf.skinny_linear_swiglu(x, w13), torch.nn.functional.silu(gate) * up)
    assert torch.equal(sf.skinny_linear_swiglu(x, w13), reference.skinny_linear_swiglu(x, w13))
    wg = w13.float().requires_grad_()
    sf.skinny_linear_swiglu(x.float(), wg).sum().backward()
    assert wg.grad is not None and wg.grad.shape == (20, 12)


def test_swiglu_tuning_times_the_unfused_pair_and_every_tile(triton_backend, monkeypatch):
    """tune_skinny_swiglu times the unfused pair (None) and every fused tile, each on the next weight
    copy, and keeps the fastest; the dispatcher then runs it without tuning again."""
    tuner = LaunchTuner("skinny_linear_swiglu")
    monkeypatch.setattr(sf, "_SWIGLU_TUNER", tuner)
    x, w13 = _swiglu_inputs(5, 24, 32, torch.float32, seed=3)
    want = _swiglu_oracle(x, w13)
    candidates = sf.swiglu_candidates(5, x.device)
    pick = candidates[2]
    seen, ptrs = [], []
    run = sl.skinny_linear_run

    launches = []

    def recording_run(a, b, c, **kw):
        if kw.get("swiglu"):   # not the unfused pair's own GEMM call inside
            ptrs.append(b.data_ptr())
            launches.append(c)
        return run(a, b, c, **kw)
    _patch_run(monkeypatch, recording_run)

    def timer(fn):
        out = fn()
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
        seen.append(len(seen))
        return 0.5 if len(seen) == 3 else 1.0   # the third candidate timed is the fastest
    key = ("cpu", torch.float32, 16, 48, 32)   # the key skinny_linear_swiglu looks up: row tile, w13's shape
    nbytes = w13.numel() * w13.element_size()
    times = sf.tune_skinny_swiglu(key, x, w13, timer, l2_bytes=nbytes)   # 2 copies rotate
    assert list(times) == candidates and tuner.chosen[key] == pick
    assert len(set(ptrs)) == 2 and all(a != b for a, b in zip(ptrs, ptrs[1:]))
    ptrs.clear()
    launches.clear()
    tune = sf.tune_skinny_swiglu
    monkeypatch.setattr(sf, "tune_skinny_swiglu", lambda *a, **k: pytest.fail("tuned twice"))
    torch.testing.assert_close(sf.skinny_linear_swiglu(x, w13).double(), want, rtol=1e-5, atol=1e-5)
    assert ptrs == [w13.data_ptr()] and launches == [pick]
    # Once the plain tuner has timed the fused weight (here by hand: a CPU tensor is never tuned),
    # only the twins of its three fastest tiles are timed.
    plain = LaunchTuner("skinny_linear")
    monkeypatch.setattr(sl, "_TUNER", plain)
    tiles = sl.skinny_candidates(5, x.device)
    plain.times[("cpu", torch.float32, 16, 48, 32)] = {c: float(len(tiles) - i) for i, c in enumerate(tiles)}
    seen.clear()
    times = tune(("cpu", torch.float32, 16, 48, 32, "again"), x, w13, timer)
    assert list(times) == [None] + [sf.swiglu_twin(c) for c in tiles[:0:-1][:3]]


@pytest.mark.gpu
@pytest.mark.parametrize("M,F,K", [(1, 11008, 4096), (64, 11008, 4096), (37, 500, 333)])
def test_gpu_bf16_swiglu_launches_tuning_and_determinism(monkeypatch, M, F, K):
    """Every SwiGLU launch in bf16 on the 7B gate/up shape (and an odd one) against float64; the
    tuner's timings; split-K and stream-K launches give the same bits at every run, in a CUDA graph
    too; the dispatcher runs the choice."""
    tuner = LaunchTuner("skinny_linear_swiglu")
    monkeypatch.setattr(sf, "_SWIGLU_TUNER", tuner)
    g = torch.Generator(device="cuda").manual_seed(M + F)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    w13 = (torch.randn(2 * F, K, device="cuda", generator=g) * K ** -0.5).bfloat16()
    want = _swiglu_oracle(x, w13)
    errors = {}

    def checked(fn):
        errors[len(errors)] = ((fn().double() - want).norm() / want.norm()).item()
        return cuda_graph_ms(fn)
    key = (str(x.device), torch.bfloat16, sl.row_tile(M), 2 * F, K)
    times = sf.tune_skinny_swiglu(key, x, w13, checked)
    plain_times = sl._TUNER.times[(str(x.device), torch.bfloat16, sl.row_tile(M), 2 * F, K)]   # tuned first
    assert list(times) == sf.swiglu_candidates(M, x.device, plain_times)
    assert max(errors.values()) < 2e-2, errors
    assert all(0 < t < 5.0 for t in times.values()), times
    out = sf.skinny_linear_swiglu(x, w13)
    assert tuner.chosen[key] == min(times, key=times.get) and list(tuner.times) == [key]
    assert ((out.double() - want).norm() / want.norm()).item() < 2e-2
    for launch in [c for c in times if c is not None and (c.split_k > 1 or c.stream_k)]:
        first = sl.skinny_linear_run(x, w13, launch, swiglu=True)
        for _ in range(5):
            assert torch.equal(sl.skinny_linear_run(x, w13, launch, swiglu=True), first), launch
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            outs = [sl.skinny_linear_run(x, w13, launch, swiglu=True) for _ in range(2)]
        torch.cuda.current_stream().wait_stream(stream)
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(o, first) for o in outs), launch
        assert int(arrival_counters(x.device, 1).abs().sum()) == 0, launch



# ------------------------------------------------------------------ rotary + cache write in the epilogue
def _rope_inputs(B, T, K, H, Hkv, D, dtype, seed, shared_freqs=False, S=24):
    """x (B, T, K), wqkv, freqs_cis, ragged slots (distinct per sequence, any order) and caches one
    sequence larger than B (whose extra row must stay untouched)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, K, generator=g).to(dtype)
    wqkv = (torch.randn((H + 2 * Hkv) * D, K, generator=g) * K ** -0.5).to(dtype)
    shape = (T, D // 2) if shared_freqs else (B, T, D // 2)
    freqs = torch.polar(torch.ones(shape), torch.randn(shape, generator=g) * 3)
    slots = torch.stack([torch.randperm(S, generator=g)[:T] for _ in range(B)])
    caches = [torch.randn(B + 1, S, Hkv, D, generator=g).to(dtype) for _ in range(2)]
    return x, wqkv, freqs, slots, caches


def _rope_reference(x, wqkv, H, Hkv, freqs, slots, caches, dtype=None):
    """The unfused pair on the reference path: the GEMM (in float64 when dtype says so, rounded to
    x's dtype), then reference.rope_cache_write; returns q and the written caches."""
    from mtp_kernels import reference

    B, T, _ = x.shape
    D = caches[0].shape[-1]
    qkv = (x.to(dtype or x.dtype) @ wqkv.to(dtype or x.dtype).T).to(x.dtype)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], -1)
    k_cache, v_cache = (c.clone() for c in caches)
    q = reference.rope_cache_write(q.reshape(B, T, H, D), k.reshape(B, T, Hkv, D), v.reshape(B, T, Hkv, D), freqs,
                                   slots, k_cache, v_cache)
    return q, k_cache, v_cache


ROPE_SHAPES = [(1, 1, 33, 3, 1, 10, True),     # one token: the multiply-add launches; regions straddle tiles
               (2, 3, 40, 4, 2, 16, False),    # GQA, per-sequence angles
               (3, 5, 24, 3, 1, 10, False),    # odd head counts: q|k|v boundaries inside tiles
               (2, 20, 64, 2, 2, 8, True)]     # 40 tokens: the 64-row tile


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,K,H,Hkv,D,shared", ROPE_SHAPES)
def test_every_rope_candidate_matches_the_reference(triton_backend, dtype, B, T, K, H, Hkv, D, shared):
    """Rotated q, and rotated k and v in their caches' slots (the other slots and the extra sequence
    untouched), from every launch the rotary tuner may pick, against the reference pair on a
    float64 GEMM."""
    x, wqkv, freqs, slots, caches = _rope_inputs(B, T, K, H, Hkv, D, dtype, seed=B * 100 + T + K, shared_freqs=shared)
    want = _rope_reference(x, wqkv, H, Hkv, freqs, slots, caches, dtype=torch.float64)
    candidates = sf.rope_candidates(B * T, x.device)
    assert candidates[0] is None and not any(c.stream_k for c in candidates[1:])
    assert any(c.split_k > 1 for c in candidates[1:])   # the rotary epilogue after a split-K combine too
    assert (T == 1 and B == 1) is any(not c.use_dot for c in candidates[1:])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=4e-3, atol=4e-3)
    for launch in candidates:
        k_cache, v_cache = (c.clone() for c in caches)
        rope = sf.RotaryCacheWrite(freqs, slots, k_cache, v_cache, H, Hkv)
        q = sl.skinny_linear_run(x.reshape(B * T, K), wqkv, launch, rope=rope)
        assert q.shape == (B * T, H * D) and q.dtype == dtype
        for got, expected in zip((q.view(B, T, H, D), k_cache, v_cache), want):
            torch.testing.assert_close(got.double(), expected.double(), **tol, msg=lambda m: f"{launch}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,K,H,Hkv,D,shared", ROPE_SHAPES)
def test_rope_epilogue_gives_the_unfused_pair_bits(triton_backend, dtype, B, T, K, H, Hkv, D, shared):
    """The same tile run plain over wqkv and then the rotary kernel, against the tile with the
    rotary epilogue: the same bits in q and in both caches."""
    from mtp_kernels.rope_cache import rope_cache_write

    x, wqkv, freqs, slots, caches = _rope_inputs(B, T, K, H, Hkv, D, dtype, seed=B + T + K, shared_freqs=shared)
    x2 = x.reshape(B * T, K)
    for launch in sf.rope_candidates(B * T, x.device)[1:]:
        unfused = [c.clone() for c in caches]
        q, k, v = sl.skinny_linear_run(x2, wqkv, launch).view(B, T, -1).split([H * D, Hkv * D, Hkv * D], -1)
        q = rope_cache_write(q.reshape(B, T, H, D), k.reshape(B, T, Hkv, D), v.reshape(B, T, Hkv, D), freqs, slots,
                             *unfused)
        fused = [c.clone() for c in caches]
        q_fused = sl.skinny_linear_run(x2, wqkv, launch, rope=sf.RotaryCacheWrite(freqs, slots, *fused, H, Hkv))
        _assert_same_bits(q_fused.view(B, T, H, D), q, launch)
        _assert_same_bits(fused[0], unfused[0], launch)
        _assert_same_bits(fused[1], unfused[1], launch)


def test_rope_candidates_are_the_twins_of_the_fastest_plain_tiles(monkeypatch):
    """On the sm_90 tables: the plain tiles but stream-K ones, half as wide (a program sums the even
    and the odd rows of its column pairs, as a SwiGLU twin sums gate and up rows); with the plain
    tuner's times, the twins of the 3 fastest of them. Stream-K or SwiGLU launches refused."""
    monkeypatch.setenv("MTP_CROSS_COMPILE", "90")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = torch.device("cpu")
    for M in (1, 16, 32, 64):
        plain = [c for c in sl.skinny_candidates(M, cpu)[1:] if not c.stream_k]
        assert sf.rope_candidates(M, cpu) == [None, *[sf.swiglu_twin(c) for c in plain]]
        times = {c: float(i) for i, c in enumerate(reversed(sl.skinny_candidates(M, cpu)[1:]))}   # the last fastest
        assert sf.rope_candidates(M, cpu, times) == [None, *[sf.swiglu_twin(c) for c in plain[::-1][:3]]]
    x, w = torch.randn(2, 24), torch.randn(24, 24)
    rope = sf.RotaryCacheWrite(torch.ones(1, 2, dtype=torch.complex64), torch.zeros(1, 2, dtype=torch.int64),
                               torch.zeros(1, 4, 1, 4), torch.zeros(1, 4, 1, 4), 4, 1)
    with pytest.raises(ValueError, match="rotary epilogue needs a launch without SwiGLU, not stream-K"):
        sl.skinny_linear_run(x, w, sl.SkinnyLaunch(16, 32, True, stream_k=1), rope=rope)
    with pytest.raises(ValueError, match="rotary epilogue needs a launch without SwiGLU, not stream-K"):
        sl.skinny_linear_run(x, w, sl.SkinnyLaunch(16, 32, True), swiglu=True, rope=rope)
    with pytest.raises(ValueError, match=r"rotary launch takes a \(4 \+ 2 x 1\) x 4-row q/k/v weight, got \(40, 24\)"):
        sl.skinny_linear_run(x, torch.randn(40, 24), sl.SkinnyLaunch(16, 32, True), rope=rope)


def test_rope_dispatch_rules_and_errors(triton_backend, monkeypatch):
    """Untuned: the unfused pair; a chosen tile runs; autograd, too many rows or caches in another
    dtype take the unfused pair; a weight or operands that do not fit the heads get a clear error."""
    tuner = LaunchTuner("skinny_linear_rope")
    monkeypatch.setattr(sf, "_ROPE_TUNER", tuner)
    B, T, K, H, Hkv, D = 2, 3, 40, 4, 2, 16
    x, wqkv, freqs, slots, caches = _rope_inputs(B, T, K, H, Hkv, D, torch.float32, seed=8)
    want = _rope_reference(x, wqkv, H, Hkv, freqs, slots, caches, dtype=torch.float64)
    used = []
    run = sl.skinny_linear_run
    _patch_run(monkeypatch, lambda *a, **k: used.append((a[2], k.get("rope") is not None)) or run(*a, **k))

    def call(**kw):
        args = dict(x=x, wqkv=wqkv, n_heads=H, n_kv_heads=Hkv, freqs_cis=freqs, slots=slots)
        args.update(kw)
        k_cache, v_cache = kw.pop("caches", None) or [c.clone() for c in caches]
        args.pop("caches", None)
        q = sf.skinny_linear_rope(k_cache=k_cache, v_cache=v_cache, **args)
        return q, k_cache, v_cache

    def close(got):
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)
    close(call())
    assert used == [(None, True), (None, False)]   # untuned: the pair, skinny_linear's GEMM then the rotary kernel
    launch = sl.SkinnyLaunch(16, 16, True, 1, 1, 16)
    tuner.chosen[("cpu", torch.float32, 16, (H + 2 * Hkv) * D, K, H * D)] = launch
    used.clear()
    close(call())
    assert used == [(launch, True)]
    used.clear()
    wg = wqkv.clone().requires_grad_()
    q, *_ = call(wqkv=wg)
    q.sum().backward()
    assert wg.grad is not None and used == []            # autograd: F.linear and the eager rotary path
    used.clear()
    call(caches=[c.half() for c in caches])                  # caches in another dtype: written by the rotary kernel
    assert used == [(None, False)]
    with pytest.raises(ValueError, match=r"wqkv must be \(\(n_heads \+ 2 n_kv_heads\) x head_dim, K\) = \(128, 40\)"):
        call(wqkv=wqkv[:-16])
    with pytest.raises(ValueError, match=r"x must be \(B, T, K\)"):
        sf.skinny_linear_rope(x[0], wqkv, H, Hkv, freqs, slots, *caches)
    with pytest.raises(ValueError, match=r"slots must be an integer \(2, 3\) tensor"):
        call(slots=slots[:, :2])
    with pytest.raises(ValueError, match=r"freqs_cis must be complex with shape \(2, 3, 8\) or \(3, 8\)"):
        call(freqs_cis=freqs[:, :2])
    with pytest.raises(ValueError, match="caches .* do not fit 2 sequences of 2 heads"):
        call(caches=[c[:1] for c in caches])
    with pytest.raises(ValueError, match=r"slots must be in \[0, S = 24\), got \d+..24"):
        call(slots=slots.clamp(max=23).index_fill(1, torch.tensor([0]), 24))


def test_rope_tuning_times_the_unfused_pair_and_the_unsplit_tiles(triton_backend, monkeypatch):
    """tune_skinny_rope times the unfused pair and every unsplit tile (each call writing the same k
    and v into the same slots), keeps the fastest, and the dispatcher then runs it."""
    tuner = LaunchTuner("skinny_linear_rope")
    monkeypatch.setattr(sf, "_ROPE_TUNER", tuner)
    B, T, K, H, Hkv, D = 1, 5, 32, 2, 1, 8
    x, wqkv, freqs, slots, caches = _rope_inputs(B, T, K, H, Hkv, D, torch.float32, seed=4)
    want = _rope_reference(x, wqkv, H, Hkv, freqs, slots, caches, dtype=torch.float64)
    k_cache, v_cache = (c.clone() for c in caches)
    rope = sf.RotaryCacheWrite(freqs, slots, k_cache, v_cache, H, Hkv)
    candidates = sf.rope_candidates(B * T, x.device)
    timed = []

    def timer(fn):
        q = fn()
        torch.testing.assert_close(q.view(B, T, H, D).double(), want[0].double(), rtol=1e-5, atol=1e-5)
        timed.append(len(timed))
        return 0.5 if len(timed) == 2 else 1.0
    key = ("cpu", torch.float32, 16, (H + 2 * Hkv) * D, K, H * D)
    times = sf.tune_skinny_rope(key, x.reshape(B * T, K), wqkv, rope, timer)
    assert list(times) == candidates and tuner.chosen[key] == candidates[1]
    torch.testing.assert_close(k_cache.double(), want[1].double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_cache.double(), want[2].double(), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,K,H,Hkv,D", [(1, 1, 4096, 32, 8, 128), (1, 64, 4096, 32, 8, 128), (3, 5, 333, 6, 2, 64)])
def test_gpu_bf16_rope_launches_and_tuning(monkeypatch, B, T, K, H, Hkv, D):
    """Every rotary launch in bf16 on the 7B q/k/v shape (and an odd one) against the reference pair
    on a float64 GEMM, the tuner's timings, and the dispatcher's choice."""
    tuner = LaunchTuner("skinny_linear_rope")
    monkeypatch.setattr(sf, "_ROPE_TUNER", tuner)
    x, wqkv, freqs, slots, caches = (t.cuda() if isinstance(t, torch.Tensor) else [c.cuda() for c in t]
                                     for t in _rope_inputs(B, T, K, H, Hkv, D, torch.bfloat16, seed=B + T, S=80))
    want = _rope_reference(x, wqkv, H, Hkv, freqs, slots, caches, dtype=torch.float64)
    k_cache, v_cache = (c.clone() for c in caches)
    rope = sf.RotaryCacheWrite(freqs, slots, k_cache, v_cache, H, Hkv)
    errors = {}

    def checked(fn):
        q = fn().view(B, T, H, D)
        errors[len(errors)] = max(((a.double() - b.double()).norm() / b.double().norm()).item()
                                  for a, b in zip((q, k_cache, v_cache), want))
        return cuda_graph_ms(fn)
    key = (str(x.device), torch.bfloat16, sl.row_tile(B * T), *wqkv.shape, H * D)
    times = sf.tune_skinny_rope(key, x.reshape(B * T, K), wqkv, rope, checked)
    plain_times = sl._TUNER.times[(str(x.device), torch.bfloat16, sl.row_tile(B * T), *wqkv.shape)]
    assert list(times) == sf.rope_candidates(B * T, x.device, plain_times)
    assert max(errors.values()) < 1e-2, errors
    assert all(0 < t < 5.0 for t in times.values()), times
    k2, v2 = (c.clone() for c in caches)
    q = sf.skinny_linear_rope(x, wqkv, H, Hkv, freqs, slots, k2, v2)
    assert tuner.chosen[key] == min(times, key=times.get) and list(tuner.times) == [key]
    for a, b in zip((q, k2, v2), want):
        assert ((a.double() - b.double()).norm() / b.double().norm()).item() < 1e-2


# ------------------------------------------------------------------ the warp-specialized tile on a GPU
def _same_bits_in_a_graph(run, first):
    """run() three times eagerly and three times from one CUDA graph: first's bits every time."""
    for _ in range(3):
        assert torch.equal(run(), first)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        outs = [run() for _ in range(3)]
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(out, first) for out in outs)


_GPU_WS_CASES = [(M, tile) for block_m, rows in ((32, (17, 32)), (64, (33, 64)))
                 for tile in sl.ws_tiles(block_m, gpu=True) for M in rows]


@pytest.mark.gpu
@pytest.mark.parametrize("M,tile", _GPU_WS_CASES, ids=[f"{M}-{t.tile_id()}" for M, t in _GPU_WS_CASES])
def test_gpu_bf16_warp_specialized_tiles(monkeypatch, M, tile):
    """One TMA-fed warp-specialized tile (skinny_ws.py) with MTP_SKINNY_WS=1 on Hopper, at a ragged
    and a full row count: bf16 plain launches at the 7B shapes, its SwiGLU and rotary twins, each
    against a float64 oracle and giving the same bits at every run and from a CUDA graph (split-K
    ones race for their counters; descriptors come from the graph's pool), counters left at zero,
    and a layout TMA cannot read sent to cuBLAS. benchmarks/gpu_check.sh offers the benchmarks the
    tiles whose every case passed here (MTP_SKINNY_WS)."""
    monkeypatch.setenv("MTP_SKINNY_WS", "1")
    device = torch.device("cuda")
    if not sl.skinny_ws_allowed(device):
        pytest.skip("the warp-specialized tiles are Hopper's (compute capability 9)")
    assert tile in sl.skinny_candidates(M, device)
    g = torch.Generator(device="cuda").manual_seed(M)
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()   # noqa: E731
    for N, K in ((12288, 4096), (4096, 11008), (4096, 4096)):
        x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
        w = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).bfloat16()
        first = sl.skinny_linear_run(x, w, tile)
        assert rel(first, x.double() @ w.double().T) < 1e-2, (N, K)
        _same_bits_in_a_graph(lambda: sl.skinny_linear_run(x, w, tile), first)
        assert int(arrival_counters(x.device, -(-N // tile.block_n)).abs().sum()) == 0
    x = torch.randn(M, 4096, device="cuda", generator=g).bfloat16()
    w13 = (torch.randn(2 * 11008, 4096, device="cuda", generator=g) * 4096 ** -0.5).bfloat16()
    twin = sf.swiglu_twin(tile)
    first = sl.skinny_linear_run(x, w13, twin, swiglu=True)
    assert rel(first, _swiglu_oracle(x, w13)) < 1e-2, twin
    _same_bits_in_a_graph(lambda: sl.skinny_linear_run(x, w13, twin, swiglu=True), first)
    B, T, H, Hkv, D = (1, M, 32, 8, 128)
    x, wqkv, freqs, slots, caches = (t.cuda() if isinstance(t, torch.Tensor) else [c.cuda() for c in t]
                                     for t in _rope_inputs(B, T, 4096, H, Hkv, D, torch.bfloat16, seed=M, S=80))
    want = _rope_reference(x, wqkv, H, Hkv, freqs, slots, caches, dtype=torch.float64)
    k_cache, v_cache = (c.clone() for c in caches)
    twin = sf.rope_twin(tile)
    q = sl.skinny_linear_run(x.reshape(B * T, -1), wqkv, twin,
                             rope=sf.RotaryCacheWrite(freqs, slots, k_cache, v_cache, H, Hkv)).view(B, T, H, D)
    assert max(rel(a, b) for a, b in zip((q, k_cache, v_cache), want)) < 1e-2, twin
    odd = torch.randn(M, 333, device="cuda", generator=g).bfloat16()     # 666-byte rows: no TMA
    w_odd = torch.randn(1000, 333, device="cuda", generator=g).bfloat16()
    assert not sl.tma_layout_ok(odd, w_odd)
    torch.testing.assert_close(sl.skinny_linear_run(odd, w_odd, tile), odd @ w_odd.T)


# ------------------------------------------------------------------ programmatic dependent launch
@pytest.mark.parametrize("early", [True, False])
@pytest.mark.parametrize("M,N,K", [(1, 37, 33), (1, 64, 128), (3, 37, 96), (17, 21, 33), (64, 16, 16)])
def test_programmatic_launches_give_the_ordinary_bits(triton_backend, monkeypatch, M, N, K, early):
    """A programmatic dependent launch (dependent_launch.py) loads each program's first weight tile
    before it waits for the kernel before it and then runs the rest of its K range (EARLY_WEIGHT_TILE),
    or waits first: every candidate (multiply-add, tl.dot, stream-K, split-K with empty splits and NaN
    scratch), plain, with SwiGLU and with the rotary epilogue, gives the bits of the ordinary launch.
    (The wait itself is a no-op under the interpreter.)"""
    _nan_scratch(monkeypatch)
    x, w = _inputs(M, N, K, torch.float16, seed=M + N + K)
    w13 = torch.cat([w, w.flip(0)])
    launches = [c for c in sl.skinny_candidates(M, x.device)[1:]]
    launches += [sl.SkinnyLaunch(16, 16, True, 1, 1, max(16, sl.row_tile(M)), split_k=s) for s in (3, 4)]
    B, T, H, Hkv, D = 1, M, 3, 1, 10
    _, wqkv, freqs, slots, caches = _rope_inputs(B, T, K, H, Hkv, D, torch.float16, seed=M, S=max(24, T))

    def results(launch):
        out = [sl.skinny_linear_run(x, w, launch), sl.skinny_linear_run(x, w13, sf.swiglu_twin(launch), swiglu=True)]
        if sf.rope_twin(launch) is not None:
            written = [c.clone() for c in caches]
            rope = sf.RotaryCacheWrite(freqs, slots, *written, H, Hkv)
            out += [sl.skinny_linear_run(x, wqkv, sf.rope_twin(launch), rope=rope), *written]
        return out

    ordinary = {launch: results(launch) for launch in launches}
    monkeypatch.setattr(sl, "launch_programmatic", lambda device: True)
    monkeypatch.setattr(sl, "EARLY_WEIGHT_TILE", early)
    for launch in launches:
        for got, want in zip(results(launch), ordinary[launch], strict=True):
            assert torch.equal(got, want), launch



# ------------------------------------------------------------------ residual add + RMSNorm in the prologue
def _normed_oracle(x, delta, g, eps):
    """(h, rms_norm(h) * g) in float64, h = x + delta rounded to x's dtype as add_rms_norm rounds it."""
    h = x if delta is None else x + delta
    hd = h.double()
    return h, hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps) * g.double()


def _norm_inputs(shape, dtype, seed, with_delta):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    delta = torch.randn(*shape, generator=gen).to(dtype) if with_delta else None
    g = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).to(dtype)
    return x, delta, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("M,F,K", [(1, 37, 33), (3, 21, 40), (17, 16, 64), (37, 9, 24)])
def test_every_norm_prologue_swiglu_launch_matches_the_oracle(triton_backend, dtype, with_delta, M, F, K):
    """rms_norm(x + delta) * g through the gate/up projection and SwiGLU, from every launch the norm
    tuner may pick (odd K, every row tile, one row's multiply-add): against float64; h = x + delta
    written with add_rms_norm's bits."""
    x, delta, g = _norm_inputs((M, K), dtype, seed=M * 10 + F + K, with_delta=with_delta)
    _, w13 = _swiglu_inputs(M, F, K, dtype, seed=M + F)
    h_want, normed = _normed_oracle(x, delta, g, 1e-5)
    want = _swiglu_oracle(normed, w13)
    norm = sn.NormPrologue(g, 1e-5, delta)
    launches = sn.norm_candidates(M, x.device, None, sf.swiglu_candidates)[1:]
    assert launches and all(c.split_k == 1 and not c.stream_k for c in launches)
    assert (M == 1) is any(not c.use_dot for c in launches)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for launch in launches:
        h_out = torch.full_like(x, float("nan")) if with_delta else None
        y = sl.skinny_linear_run(x, w13, launch, swiglu=True, norm=norm, h_out=h_out)
        torch.testing.assert_close(y.double(), want, **tol, msg=lambda m: f"{launch}: {m}")
        if with_delta:
            assert torch.equal(h_out, h_want), launch   # every row, every column: program 0 wrote them all


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,K,H,Hkv,D,shared", ROPE_SHAPES[:3])
def test_every_norm_prologue_rope_launch_matches_the_reference(triton_backend, dtype, B, T, K, H, Hkv, D, shared):
    """The q/k/v projection of rms_norm(x + delta) * g with the rotary epilogue: q and both caches
    against the reference pair on float64 inputs."""
    x, wqkv, freqs, slots, caches = _rope_inputs(B, T, K, H, Hkv, D, dtype, seed=B * 7 + T + K, shared_freqs=shared)
    _, delta, g = _norm_inputs((B, T, K), dtype, seed=B + T, with_delta=True)
    h_want, normed = _normed_oracle(x, delta, g, 1e-6)
    want = _rope_reference(normed, wqkv.double(), H, Hkv, freqs, slots, [c.double() for c in caches])
    norm = sn.NormPrologue(g, 1e-6, delta)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for launch in sn.norm_candidates(B * T, x.device, None, sf.rope_candidates)[1:]:
        k_cache, v_cache = (c.clone() for c in caches)
        h_out = torch.empty(B * T, K, dtype=dtype)
        q = sl.skinny_linear_run(x.reshape(B * T, K), wqkv, launch, rope=sf.RotaryCacheWrite(freqs, slots, k_cache,
                                                                                             v_cache, H, Hkv),
                                 norm=norm, h_out=h_out)
        assert torch.equal(h_out.view(B, T, K), h_want), launch
        for got, expected in zip((q.view(B, T, H, D), k_cache, v_cache), want):
            torch.testing.assert_close(got.double(), expected, **tol, msg=lambda m: f"{launch}: {m}")


def _swiglu_norm_tuning(monkeypatch):
    """A fresh gate/up norm tuner that tunes on a CPU (every launch timed at 1 ms), and its inputs:
    (tuner, x (2, 40), delta, norm weight, w13 (42, 40))."""
    from mtp_kernels import launch_tuner

    tuner = LaunchTuner("skinny_linear_swiglu_norm")
    monkeypatch.setitem(sn._NORM_TUNERS, "skinny_linear_swiglu", tuner)
    monkeypatch.setattr(launch_tuner, "tuning_enabled", lambda device: True)
    monkeypatch.setattr(launch_tuner, "cuda_graph_ms", lambda fn, *a, **k: (fn(), 1.0)[1])
    x, delta, g = _norm_inputs((2, 40), torch.float32, seed=8, with_delta=True)
    _, w13 = _swiglu_inputs(2, 21, 40, torch.float32, seed=9)
    return tuner, x, delta, g, w13


def test_epilogue_tuners_check_every_write_of_a_launch(triton_backend, monkeypatch):
    """A rotary launch that returns the right q but writes a wrong v into the cache, a SwiGLU launch
    with a wrong gate, and a norm prologue launch that returns the right gate but a wrong residual
    stream h, are left out by their tuners (with a warning) however fast they time: the tuners check
    all that a launch writes."""
    run = sl.skinny_linear_run
    B, T, K, H, Hkv, D = 1, 3, 32, 2, 1, 8
    x, wqkv, freqs, slots, caches = _rope_inputs(B, T, K, H, Hkv, D, torch.float32, seed=7)
    want = _rope_reference(x, wqkv, H, Hkv, freqs, slots, caches, dtype=torch.float64)
    rope = sf.RotaryCacheWrite(freqs, slots, *(c.clone() for c in caches), H, Hkv)
    bad = sf.rope_candidates(B * T, x.device)[1]

    corrupt_h = True

    def faulty(x2, weight, launch, *args, **kwargs):
        y = run(x2, weight, launch, *args, **kwargs)
        if launch == bad and kwargs.get("rope") is not None:
            kwargs["rope"].v_cache[0, kwargs["rope"].slots[0]] += 1.0   # q right, one sequence's v off
        if launch == bad and kwargs.get("h_out") is not None and corrupt_h:
            kwargs["h_out"].mul_(1.05)                # gate right, h 5% off
        return y
    _patch_run(monkeypatch, faulty)
    monkeypatch.setattr(sf, "_ROPE_TUNER", LaunchTuner("skinny_linear_rope"))
    key = ("cpu", torch.float32, 16, (H + 2 * Hkv) * D, K, H * D)
    with pytest.warns(UserWarning, match="disagree with the reference"):
        times = sf.tune_skinny_rope(key, x.reshape(B * T, K), wqkv, rope, timer=lambda fn: (fn(), 1.0)[1])
    assert times[bad] == float("inf") and sum(t == 1.0 for t in times.values()) == len(times) - 1
    # The probes leave the caches as the launches write them, here the last candidate's (a right one).
    torch.testing.assert_close(rope.v_cache.double(), want[2].double(), rtol=1e-5, atol=1e-5)
    # The SwiGLU epilogue: a launch whose gate is 5% off.
    xs, w13 = _swiglu_inputs(3, 21, 40, torch.float32, seed=6)
    bad_swiglu = sf.swiglu_candidates(3, xs.device, None)[1]

    def wrong_gate(x2, weight, launch, *args, **kwargs):
        y = run(x2, weight, launch, *args, **kwargs)
        return y * 1.05 if launch == bad_swiglu and kwargs.get("swiglu") else y
    _patch_run(monkeypatch, wrong_gate)
    monkeypatch.setattr(sf, "_SWIGLU_TUNER", LaunchTuner("skinny_linear_swiglu"))
    with pytest.warns(UserWarning, match="disagree with the reference"):
        times = sf.tune_skinny_swiglu(("cpu", torch.float32, 16, 42, 40), xs, w13, timer=lambda fn: (fn(), 1.0)[1])
    assert times[bad_swiglu] == float("inf") and sum(t == 1.0 for t in times.values()) == len(times) - 1
    _patch_run(monkeypatch, faulty)

    tuner, x, delta, g, w13 = _swiglu_norm_tuning(monkeypatch)
    bad = sn.norm_candidates(2, x.device, None, sf.swiglu_candidates)[1]
    with pytest.warns(UserWarning, match="disagree with the reference"):
        sf.skinny_linear_swiglu(x, w13, norm=sn.NormPrologue(g, 1e-5, delta))
    (_, times), = tuner.times.items()
    assert times[bad] == float("inf") and sum(t == 1.0 for t in times.values()) == len(times) - 1
    # The rotary projection behind a norm prologue: its tuner checks q, h and the cache writes (here
    # q and h are right, v is not).
    corrupt_h = False
    tuner = LaunchTuner("skinny_linear_rope_norm")
    monkeypatch.setitem(sn._NORM_TUNERS, "skinny_linear_rope", tuner)
    x, wqkv, freqs, slots, caches = _rope_inputs(B, T, 40, H, Hkv, D, torch.float32, seed=10)
    delta, g = x.flip(-1).clone(), 1 + x[0, 0].abs()
    bad = sn.norm_candidates(B * T, x.device, None, sf.rope_candidates)[1]
    with pytest.warns(UserWarning, match="disagree with the reference"):
        sf.skinny_linear_rope(x, wqkv, H, Hkv, freqs, slots, *caches, norm=sn.NormPrologue(g, 1e-5, delta))
    (_, times), = tuner.times.items()
    assert times[bad] == float("inf") and sum(t == 1.0 for t in times.values()) == len(times) - 1


def test_norm_prologue_dispatch_tuned_launch_and_unfused_pair(triton_backend, monkeypatch):
    """skinny_linear_swiglu(norm=...): the unfused pair (add_rms_norm, then the projection) until a
    launch is tuned for the key, then that launch; both give (gate, h) with h = x + delta."""
    from mtp_kernels import add_rms_norm

    tuner = LaunchTuner("skinny_linear_swiglu_norm")
    monkeypatch.setitem(sn._NORM_TUNERS, "skinny_linear_swiglu", tuner)
    x, delta, g = _norm_inputs((1, 3, 40), torch.float32, seed=5, with_delta=True)
    _, w13 = _swiglu_inputs(3, 21, 40, torch.float32, seed=6)
    norm = sn.NormPrologue(g, 1e-5, delta)
    y, h = sf.skinny_linear_swiglu(x, w13, norm=norm)            # nothing tuned on a CPU: the unfused pair
    h_pair, normed = add_rms_norm(x, delta, g, 1e-5)
    assert torch.equal(h, h_pair) and torch.equal(y, sf.skinny_linear_swiglu(normed, w13)) and y.shape == (1, 3, 21)
    launch = sn.norm_candidates(3, x.device, None, sf.swiglu_candidates)[1]
    used = []   # (launch, with a norm prologue) of every skinny launch: the tuned one must be the one run
    run = sl.skinny_linear_run
    _patch_run(monkeypatch, lambda *a, **k: used.append((a[2], k.get("norm") is not None)) or run(*a, **k))
    tuner.chosen[(str(x.device), torch.float32, 16, 42, 40, 0, True)] = launch
    y_fused, h_fused = sf.skinny_linear_swiglu(x, w13, norm=norm)
    assert used == [(launch, True)]
    assert torch.equal(h_fused, h_pair) and y_fused.shape == (1, 3, 21)
    torch.testing.assert_close(y_fused, y, rtol=1e-4, atol=1e-4)
    no_delta = sn.NormPrologue(g, 1e-5)
    used.clear()
    y0, h0 = sf.skinny_linear_swiglu(x, w13, norm=no_delta)     # no delta: h is x itself, a key of its own
    assert h0 is x and all(not with_norm for _, with_norm in used)   # untuned: the unfused pair
    tuner.chosen[(str(x.device), torch.float32, 16, 42, 40, 0, False)] = launch
    used.clear()
    y1, h1 = sf.skinny_linear_swiglu(x, w13, norm=no_delta)
    assert h1 is x and used == [(launch, True)]
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-4)


def test_norm_prologue_tuning_times_the_unfused_pair_and_unsplit_twins(triton_backend, monkeypatch):
    """A stand-in timer on the tuning path: the unfused pair first, then the SwiGLU twins without a
    K split or stream-K; the fastest kept."""
    tuner, x, delta, g, w13 = _swiglu_norm_tuning(monkeypatch)
    y, h = sf.skinny_linear_swiglu(x, w13, norm=sn.NormPrologue(g, 1e-5, delta))
    (key, times), = tuner.times.items()
    assert list(times)[0] is None and len(times) > 1
    assert all(c.split_k == 1 and not c.stream_k for c in list(times)[1:])
    assert tuner.chosen[key] is None    # a tie keeps the unfused pair


def test_norm_prologue_errors(triton_backend):
    x, delta, g = _norm_inputs((2, 40), torch.float32, seed=3, with_delta=True)
    _, w13 = _swiglu_inputs(2, 21, 40, torch.float32, seed=4)
    with pytest.raises(ValueError, match=r"norm weight must be \(40,\)"):
        sf.skinny_linear_swiglu(x, w13, norm=sn.NormPrologue(g[:7], 1e-5, delta))
    with pytest.raises(ValueError, match="delta must have x's shape"):
        sf.skinny_linear_swiglu(x, w13, norm=sn.NormPrologue(g, 1e-5, delta[:1]))
    with pytest.raises(ValueError, match="delta on meta"):
        sf.skinny_linear_swiglu(x, w13, norm=sn.NormPrologue(g, 1e-5, delta.to("meta")))
    split = next(c for c in sf.swiglu_candidates(2, x.device)[1:] if c.split_k > 1)
    with pytest.raises(ValueError, match="norm prologue needs an unsplit kernel launch"):
        sl.skinny_linear_run(x, w13, split, swiglu=True, norm=sn.NormPrologue(g, 1e-5, delta), h_out=x.clone())
    unsplit = sn.norm_candidates(2, x.device, None, sf.swiglu_candidates)[1]
    with pytest.raises(ValueError, match="give both or neither"):
        sl.skinny_linear_run(x, w13, unsplit, swiglu=True, norm=sn.NormPrologue(g, 1e-5, delta))


def test_decode_step_with_the_norm_prologue_matches_the_unfused_step(triton_backend, monkeypatch):
    """A model's decode step with every block's add + norm in its q/k/v and gate/up launches: logits
    as the unfused step's (float32), no norm kernel left but the final one, and, launched
    programmatically (the early weight tile before the prologue), the same bits again."""
    import collections

    from _decode_steps import recorded_decode_step
    from mtp_engine.model import ModelArgs, Transformer
    from mtp_kernels import dependent_launch

    monkeypatch.setenv("MTP_TUNE", "0")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                                  n_future_tokens=2, max_seq_len=32, max_batch_size=2)).eval()
    for p in model.parameters():   # norm weights away from 1, so that a missing weight would show
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    model.fuse_projections()
    tokens = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    launches = collections.Counter()

    def step():
        launches.clear()
        return recorded_decode_step(model, tokens, 2, lambda name, kwargs: launches.update([name]))

    with torch.no_grad():
        unfused = step()
        assert launches["_add_rms_norm_fwd_kernel"] + launches["_rms_norm_fwd_kernel"] == 2 * 3 + 1
        tile = sl.SkinnyLaunch(16, 16, True, 1, 1, 16)
        for tuner in sn._NORM_TUNERS.values():
            monkeypatch.setattr(tuner, "choose", lambda key, *args: tile if key[2] == 16 else None)
        fused = step()
        assert launches["_add_rms_norm_fwd_kernel"] + launches["_rms_norm_fwd_kernel"] == 1   # the final norm
        torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)
        monkeypatch.setattr(dependent_launch, "programmatic_supported", lambda device: True)
        with dependent_launch.programmatic_launch():
            assert torch.equal(step(), fused)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16])   # the multiply-add launches and the 16-row tiles (32 rows: interpreter)
def test_gpu_bf16_norm_prologue_launches_and_tuning(monkeypatch, M):
    """bf16 on a GPU: every launch the norm tuners may pick, with SwiGLU (the 7B's gate/up weight)
    and with rotary + cache write (8 + 2 x 2 heads of 128), against float64, h with add_rms_norm's
    bits; then the tuners time the unfused pair against them as CUDA-graph replays, dispatch their
    choice, and a CUDA graph of the dispatched call replays the same bits."""
    from mtp_kernels import add_rms_norm

    for name in sn._NORM_TUNERS:
        monkeypatch.setitem(sn._NORM_TUNERS, name, LaunchTuner(name + "_norm"))
    g = torch.Generator(device="cuda").manual_seed(M)
    K, F = 4096, 11008
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16() * 3
    delta = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    weight = (1 + 0.5 * torch.randn(K, device="cuda", generator=g)).bfloat16()
    w13 = (torch.randn(2 * F, K, device="cuda", generator=g) * K ** -0.5).bfloat16()
    h_want, normed = _normed_oracle(x, delta, weight, 1e-5)
    want = _swiglu_oracle(normed, w13)
    norm = sn.NormPrologue(weight, 1e-5, delta)
    launches = sn.norm_candidates(M, x.device, None, sf.swiglu_candidates)[1:]
    assert launches
    for launch in launches:
        h_out = torch.empty_like(x)
        y = sl.skinny_linear_run(x, w13, launch, swiglu=True, norm=norm, h_out=h_out)
        assert torch.equal(h_out, h_want), launch
        assert ((y.double() - want).norm() / want.norm()).item() < 2e-2, launch
    y, h = sf.skinny_linear_swiglu(x, w13, norm=norm)          # tunes, then runs the choice
    (key, times), = sn._NORM_TUNERS["skinny_linear_swiglu"].times.items()
    assert all(0 < t < 5.0 for t in times.values()), times
    assert torch.equal(h, add_rms_norm(x, delta, weight, 1e-5)[0])
    assert ((y.double() - want).norm() / want.norm()).item() < 2e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph, _ = sf.skinny_linear_swiglu(x, w13, norm=norm)
    graph.replay()
    assert torch.equal(y_graph, y)
    # The rotary form, on a smaller q/k/v weight: q and both caches against the float64 pair.
    B, T, H, Hkv, D, K2 = 1, M, 8, 2, 128, 1024
    x3 = torch.randn(B, T, K2, device="cuda", generator=g).bfloat16()
    d3 = torch.randn(B, T, K2, device="cuda", generator=g).bfloat16()
    w3 = (1 + 0.5 * torch.randn(K2, device="cuda", generator=g)).bfloat16()
    wqkv = (torch.randn((H + 2 * Hkv) * D, K2, device="cuda", generator=g) * K2 ** -0.5).bfloat16()
    freqs = torch.polar(torch.ones(B, T, D // 2, device="cuda"), torch.randn(B, T, D // 2, device="cuda", generator=g))
    slots = torch.arange(T, device="cuda")[None]
    caches = [torch.zeros(B, 64, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    h3_want, normed3 = _normed_oracle(x3, d3, w3, 1e-6)
    want3 = _rope_reference(normed3, wqkv.double(), H, Hkv, freqs, slots, [c.double() for c in caches])
    q, h3 = sf.skinny_linear_rope(x3, wqkv, H, Hkv, freqs, slots, *caches, norm=sn.NormPrologue(w3, 1e-6, d3))
    assert torch.equal(h3, h3_want)
    for got, expected in zip((q, *caches), want3):
        assert ((got.double() - expected).norm() / expected.norm()).item() < 2e-2

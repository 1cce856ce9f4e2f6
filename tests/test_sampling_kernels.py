"""linear_argmax / linear_sample: Triton kernels (interpreted on CPU) against the references."""
import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from mtp_kernels import linear_argmax, linear_logits, linear_sample, linear_topk, reference
from mtp_kernels.sampling import _sampling_uniforms


def _logits(hidden, weight):
    return hidden.float() @ weight.float().T


def _assert_argmax_of(tokens, logits, tol):
    """tokens pick a maximal logit of each row (within the float32 summation-order noise `tol`),
    and equal torch.argmax wherever the row's best logit beats every other by more than tol."""
    best, expected = logits.max(dim=1)
    chosen = logits.gather(1, tokens[:, None])[:, 0]
    assert (chosen >= best - tol).all()
    runner_up = logits.scatter(1, expected[:, None], float("-inf")).max(dim=1).values
    clear_winner = best - runner_up > tol
    assert clear_winner.any()
    assert torch.equal(tokens[clear_winner], expected[clear_winner])


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson goodness of fit; bins with < 5 expected draws are pooled (the chi-square
    approximation needs it). p = P(chi2_{k-1} >= statistic) = Q((k-1)/2, statistic/2)."""
    n = counts.sum().item()
    expected = probs.double() * n
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    if expected[-1] == 0:
        assert observed[-1] == 0
        observed, expected = observed[:-1], expected[:-1]
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = len(expected) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2).item()


# --------------------------------------------------------------------------------------------
# argmax
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("R,V,D", [(1, 1001, 33), (3, 4097, 64), (37, 1001, 64), (3, 1001, 33), (1, 4097, 64)])
def test_argmax_matches_reference(triton_backend, dtype, R, V, D):
    gen = torch.Generator().manual_seed(R * 7919 + V + D)
    hidden = torch.randn(R, D, generator=gen).to(dtype)
    weight = torch.randn(V, D, generator=gen).to(dtype)
    tokens = linear_argmax(hidden, weight)
    assert tokens.dtype == torch.int64 and tokens.shape == (R,)
    _assert_argmax_of(tokens, _logits(hidden, weight), tol=1e-4 * math.sqrt(D))
    _assert_argmax_of(reference.linear_argmax(hidden, weight), _logits(hidden, weight), tol=1e-4 * math.sqrt(D))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_argmax_ties_take_the_smallest_index(triton_backend, dtype):
    # Small integers: every logit is an exact float32 sum in any order, so ties are real ties.
    gen = torch.Generator().manual_seed(1)
    R, V, D = 37, 1001, 33
    # Planted maximum shared by tokens 5, 9 (same vocab block), 70 and V - 1 (later blocks).
    hidden = torch.zeros(R, D, dtype=dtype)
    hidden[:, :4] = torch.tensor([1.0, -1.0, 2.0, 1.0])
    weight = torch.randint(-2, 3, (V, D), generator=gen).to(dtype)
    weight[[5, 9, 70, V - 1], :4] = torch.tensor([3.0, -3.0, 3.0, 3.0], dtype=dtype)
    logits = _logits(hidden, weight)
    assert (logits[:, [5, 9, 70, V - 1]] == logits.max(dim=1, keepdim=True).values).all()
    assert torch.equal(linear_argmax(hidden, weight), torch.full((R,), 5))
    # And random integer data, full of ties among the non-planted tokens too.
    hidden = torch.randint(-2, 3, (R, D), generator=gen).to(dtype)
    weight = torch.randint(-1, 2, (V, D), generator=gen).to(dtype)
    expected = torch.argmax(_logits(hidden, weight), dim=1)
    assert torch.equal(linear_argmax(hidden, weight), expected)
    assert torch.equal(reference.linear_argmax(hidden, weight), expected)


def test_argmax_tie_across_vocab_blocks_and_a_lone_winner_at_the_end(triton_backend):
    V, D = 300, 16
    hidden = torch.ones(2, D)
    weight = torch.zeros(V, D)
    weight[[130, 299]] = 1.0          # row 0: equal maxima in different vocab blocks -> 130
    hidden[1, 0] = -1.0
    weight[299, 0] = -5.0              # row 1: only the last token wins (masked tail of the last block)
    weight[130, 0] = 5.0
    assert linear_argmax(hidden, weight).tolist() == [130, 299]


def test_argmax_strided_rows_and_empty(triton_backend):
    # Head 0's rows of (B, T, n_heads, D) hidden states: a strided 2-D view.
    gen = torch.Generator().manual_seed(2)
    heads = torch.randint(-3, 4, (2, 5, 3, 40), generator=gen).float()
    weight = torch.randint(-3, 4, (257, 40), generator=gen).float()
    hidden = heads[:, :, 0].reshape(-1, 40)
    assert hidden.stride(0) == 3 * 40
    assert torch.equal(linear_argmax(hidden, weight), torch.argmax(_logits(hidden, weight), dim=1))
    assert linear_argmax(hidden[:0], weight).shape == (0,)


def test_single_token_vocabulary(triton_backend):
    hidden = torch.randn(4, 8)
    weight = torch.randn(1, 8)
    assert linear_argmax(hidden, weight).tolist() == [0] * 4
    assert linear_sample(hidden, weight, temperature=1.0).tolist() == [0] * 4


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_logits_are_float32_accumulated(request, use_kernel, dtype):
    """float32 logits of 16-bit operands, against float64: no rounding to the operands' dtype, so
    fp16 logits past fp16's range stay finite (the log-probs' input). Strided rows and none."""
    if use_kernel:
        request.getfixturevalue("triton_backend")
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 2 * 33, generator=g).to(dtype)[:, ::2]
    weight = (torch.randn(1001, 33, generator=g) * 6000).to(dtype)   # |logits| up to ~1e5 > fp16 max 65504
    logits = linear_logits(hidden, weight)
    want = hidden.double() @ weight.double().T
    assert logits.dtype == torch.float32 and logits.shape == (5, 1001) and torch.isfinite(logits).all()
    assert want.abs().max() > 65504
    torch.testing.assert_close(logits.double(), want, rtol=1e-5, atol=0.5)
    assert linear_logits(hidden[:0], weight).shape == (0, 1001)
    with pytest.raises(ValueError, match="linear_logits: hidden dtype"):
        linear_logits(hidden.double(), weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_logits_convert_a_16_bit_weight_block_by_block(monkeypatch, dtype):
    """The CPU path's float32 logits of a 16-bit weight equal those of its float32 copy, without
    making that copy: no float32 tensor the size of the weight exists at any point."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestFloat32(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    self.numel = max(self.numel, t.numel())
            return out

    monkeypatch.setattr(reference, "_WEIGHT_ROWS_PER_BLOCK", 100)   # V 1001: 10 blocks and one of a row
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(5, 24, generator=gen).to(dtype)
    weight = torch.randn(1001, 24, generator=gen).to(dtype)
    largest = LargestFloat32()
    with largest:
        logits = reference._float32_logits(hidden, weight)
    assert largest.numel < weight.numel() // 4, largest.numel      # blocks of 100 rows, the (5, 1001) logits
    torch.testing.assert_close(logits, _logits(hidden, weight), rtol=1e-6, atol=1e-6)
    assert torch.equal(reference.linear_argmax(hidden, weight), torch.argmax(_logits(hidden, weight), dim=1))


@pytest.mark.parametrize("use_kernel", [True, False])
def test_temperature_zero_is_argmax(request, use_kernel):
    if use_kernel:
        request.getfixturevalue("triton_backend")
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randint(-2, 3, (9, 24), generator=gen).float()
    weight = torch.randint(-2, 3, (513, 24), generator=gen).float()
    expected = torch.argmax(_logits(hidden, weight), dim=1)
    assert torch.equal(linear_sample(hidden, weight, temperature=0.0, top_p=0.5), expected)
    assert torch.equal(linear_sample(hidden, weight, temperature=0), expected)


# --------------------------------------------------------------------------------------------
# sampling: distribution, nucleus, reproducibility
# --------------------------------------------------------------------------------------------
def _one_vector_many_rows(n_rows, V=13, D=16, seed=4):
    """The same hidden vector in every row: each row is an independent draw from one distribution."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, D, generator=gen).repeat(n_rows, 1)
    weight = torch.randn(V, D, generator=gen) * 0.4
    return hidden, weight


@pytest.mark.parametrize("use_kernel", [True, False])
def test_sampling_follows_softmax(request, use_kernel):
    if use_kernel:
        request.getfixturevalue("triton_backend")
    temperature = 0.8
    hidden, weight = _one_vector_many_rows(4000)
    tokens = linear_sample(hidden, weight, temperature=temperature, generator=torch.Generator().manual_seed(5))
    counts = torch.bincount(tokens, minlength=weight.shape[0])
    probs = torch.softmax(_logits(hidden[:1], weight)[0] / temperature, dim=0)
    assert _chi_square_p_value(counts, probs) > 1e-3
    # The test has power: the same draws are far from a different temperature's distribution.
    probs_hot = torch.softmax(_logits(hidden[:1], weight)[0] / (2 * temperature), dim=0)
    assert _chi_square_p_value(counts, probs_hot) < 1e-6


@pytest.mark.parametrize("use_kernel", [True, False])
def test_top_p_draws_only_from_the_nucleus(request, use_kernel):
    if use_kernel:
        request.getfixturevalue("triton_backend")
    temperature, top_p = 1.0, 0.6
    hidden, weight = _one_vector_many_rows(2000, seed=6)
    tokens = linear_sample(hidden, weight, temperature=temperature, top_p=top_p,
                           generator=torch.Generator().manual_seed(7))
    probs = torch.softmax(_logits(hidden[:1], weight)[0] / temperature, dim=0)
    sorted_probs, order = torch.sort(probs, descending=True)
    n_kept = int(((torch.cumsum(sorted_probs, 0) - sorted_probs) <= top_p).sum())
    nucleus = order[:n_kept]
    assert 1 < n_kept < weight.shape[0]
    assert torch.isin(tokens, nucleus).all()
    counts = torch.bincount(tokens, minlength=weight.shape[0])[nucleus]
    assert _chi_square_p_value(counts, sorted_probs[:n_kept] / sorted_probs[:n_kept].sum()) > 1e-3


@pytest.mark.filterwarnings("ignore:overflow encountered in matmul:RuntimeWarning")   # the interpreter's numpy
@pytest.mark.parametrize("use_kernel", [True, False])
def test_non_finite_logits_follow_the_same_rules_with_and_without_a_nucleus(request, use_kernel):
    """+inf logits (a float32 overflow) take the row, NaN counts as -inf, a row with nothing above -inf
    gives token 0: with top_p < 1 as in the Gumbel-max path (torch.multinomial refused those rows)."""
    if use_kernel:
        request.getfixturevalue("triton_backend")
    weight = torch.randn(10, 4, generator=torch.Generator().manual_seed(8))
    weight[3] = 3e38                                   # logit 3 overflows to +inf for a row of ones
    hidden = torch.ones(3, 4)
    hidden[1, 0] = float("nan")                        # every logit NaN
    hidden[2] = -1.0                                   # logit 3 is -inf, the others finite
    for seed in range(4):
        for top_p in (1.0, 0.5):
            tokens = linear_sample(hidden, weight, temperature=0.7, top_p=top_p,
                                   generator=torch.Generator().manual_seed(seed))
            assert tokens[:2].tolist() == [3, 0] and tokens[2] != 3, (seed, top_p)


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_same_generator_state_same_tokens(triton_backend, top_p):
    hidden, weight = _one_vector_many_rows(64, V=50)
    def draw(seed):
        return linear_sample(hidden, weight, temperature=1.5, top_p=top_p,
                             generator=torch.Generator().manual_seed(seed))

    first = draw(11)
    assert torch.equal(first, draw(11))
    assert not torch.equal(first, draw(12))
    # Consecutive calls advance the generator: fresh noise every step.
    gen = torch.Generator().manual_seed(11)
    step1 = linear_sample(hidden, weight, temperature=1.5, top_p=top_p, generator=gen)
    step2 = linear_sample(hidden, weight, temperature=1.5, top_p=top_p, generator=gen)
    assert torch.equal(step1, first) and not torch.equal(step1, step2)


def test_gumbel_noise_does_not_depend_on_the_tiling(triton_backend, monkeypatch):
    # The Philox counter is row * V + token, so a different tile shape gives the same draws.
    from mtp_kernels import sampling

    hidden, weight = _one_vector_many_rows(40, V=300)
    def draw():
        return linear_sample(hidden, weight, temperature=1.0, generator=torch.Generator().manual_seed(8))

    first = draw()
    original = sampling._launch_config
    monkeypatch.setattr(sampling, "_launch_config",
                        lambda *args: {**original(*args), "BLOCK_V": 128, "BLOCK_R": 32})
    assert torch.equal(first, draw())


# --------------------------------------------------------------------------------------------
# keyed noise: Philox per row (seeds, offsets), the same bits on both paths
# --------------------------------------------------------------------------------------------
def test_philox_known_answers():
    """Random123's known-answer vectors for Philox-4x32-10 (kat_vectors): key, counter -> output."""
    cases = [((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for key, counter, want in cases:
        got = reference.philox4x32(*(torch.tensor([v]) for v in key + counter))
        assert [int(t) for t in got] == list(want)
        got = reference.philox4x32(*(np.array([v], dtype=np.uint64) for v in key + counter))   # the CPU's few-token path
        assert [int(t[0]) for t in got] == list(want)


def _keys(R, seed=0):
    """Seeds and offsets that use both 32-bit words of each."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 ** 63 - 1, (R,), generator=g), torch.randint(0, 2 ** 40, (R,), generator=g)


@triton.jit
def _uniforms_kernel(seed_ptr, offset_ptr, out_ptr, R, V, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    # The selection kernel's noise, written out; seeds read with stride 2.
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    u = _sampling_uniforms(seed_ptr, offset_ptr, 2, 1, offs_r, offs_v, R, BLOCK_R, BLOCK_V)
    tl.store(out_ptr + offs_r[:, None] * V + offs_v[None, :], u, mask=(offs_r[:, None] < R) & (offs_v[None, :] < V))


def test_kernel_uniforms_equal_the_reference_bit_for_bit(triton_backend):
    R, V = 5, 37
    seeds, offsets = _keys(R)
    strided_seeds = torch.stack([seeds, torch.zeros_like(seeds)], dim=1).flatten()   # stride 2
    out = torch.full((R, V), -1.0)
    _uniforms_kernel[(triton.cdiv(R, 4), triton.cdiv(V, 16))](strided_seeds, offsets, out, R, V, BLOCK_R=4, BLOCK_V=16)
    want = reference.sampling_uniforms(seeds, offsets, V)
    assert torch.equal(out, want)
    assert 0.0 <= float(want.min()) and float(want.max()) < 1.0 and len(want.unique()) == R * V


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_keyed_draws_equal_the_reference_and_ignore_the_batch(request, backend, top_p):
    """A row's token is a function of its logits and its (seed, offset): the kernel draws the
    reference's tokens, and a row alone, or in another order among other rows, draws the same."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    g = torch.Generator().manual_seed(3)
    R, V, D = 9, 1001, 16
    hidden, weight = torch.randn(R, D, generator=g), torch.randn(V, D, generator=g) * 0.3
    seeds, offsets = _keys(R, seed=1)
    tokens = linear_sample(hidden, weight, temperature=1.3, top_p=top_p, seeds=seeds, offsets=offsets)
    want = reference.linear_sample(hidden, weight, temperature=1.3, top_p=top_p, seeds=seeds, offsets=offsets)
    assert torch.equal(tokens, want)
    order = torch.randperm(R, generator=g)
    shuffled = linear_sample(hidden[order], weight, temperature=1.3, top_p=top_p, seeds=seeds[order],
                             offsets=offsets[order])
    assert torch.equal(shuffled, tokens[order])
    alone = linear_sample(hidden[4:5], weight, temperature=1.3, top_p=top_p, seeds=seeds[4:5], offsets=offsets[4:5])
    assert alone.tolist() == tokens[4:5].tolist()
    # The key matters: another offset (the next position) draws otherwise somewhere in the batch.
    assert not torch.equal(linear_sample(hidden, weight, temperature=1.3, top_p=top_p, seeds=seeds,
                                         offsets=offsets + 1), tokens)


def test_gumbel_noise_only_where_it_can_win_gives_the_same_tokens(monkeypatch):
    """The reference draws noise only for tokens within the noise's ceiling of the winner's floor
    (a peaked row: a handful); against the whole noise, on peaked, flat and non-finite rows."""
    g = torch.Generator().manual_seed(21)
    R, V = 400, 257
    scale = torch.tensor([0.1, 1.0, 5.0, 40.0]).repeat_interleave(R // 4)[:, None]
    logits = torch.randn(R, V, generator=g) * scale
    logits[0] = float("-inf")
    logits[1, 7] = float("inf")
    logits[2, :5] = float("-inf")
    logits[3, 9] = float("nan")
    seeds, offsets = _keys(R, seed=5)

    def draw(share, top_p):
        monkeypatch.setattr(reference, "_DENSE_NOISE_SHARE", share)
        return reference.sample_logits(logits, 0.9, top_p, seeds, offsets)

    for top_p in (1.0, 0.9):
        dense, sparse = draw(0.0, top_p), draw(2.0, top_p)
        assert torch.equal(dense, sparse), top_p
        assert dense[0] == 0 and dense[1] == 7
    monkeypatch.setattr(reference, "_DENSE_NOISE_SHARE", 2.0)
    calls = []
    uniforms = reference._token_uniforms
    monkeypatch.setattr(reference, "_token_uniforms", lambda *args: calls.append(len(args[2])) or uniforms(*args))
    reference.sample_logits(logits[-100:], 0.9, 1.0, seeds[-100:], offsets[-100:])   # scale 40: peaked rows
    assert len(calls) == 1 and calls[0] < 100 * 6   # a few candidates per row, of 257 tokens
    # The case the candidates leave open: the best token's own noise is -inf (u == 0). The row
    # then draws its whole noise, as the dense path does.
    peaked = torch.full((1, V), -100.0)
    peaked[0, 3], peaked[0, 200] = 50.0, 20.0
    monkeypatch.setattr(reference, "_token_uniforms", lambda s, o, tokens: torch.where(tokens == 3, 0.0, 0.5))
    dense_uniforms = reference.sampling_uniforms
    monkeypatch.setattr(reference, "sampling_uniforms",
                        lambda s, o, V: torch.where(torch.arange(V) == 3, 0.0, dense_uniforms(s, o, V)))
    assert reference.sample_logits(peaked, 1.0, 1.0, seeds[:1], offsets[:1]).tolist() == [200]


def _six_rows(generator_seed: int, key_seed: int):
    """The per-row tests' case: R = 6 rows of D = 16 against V = 301 tokens, and their keys."""
    g = torch.Generator().manual_seed(generator_seed)
    R, V, D = 6, 301, 16
    hidden, weight = torch.randn(R, D, generator=g), torch.randn(V, D, generator=g) * 0.5
    return (R, V, hidden, weight) + _keys(R, seed=key_seed)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_per_row_temperature_and_top_p_equal_each_row_alone(request, backend):
    """temperature and top_p as (R,) tensors, one per row (0: that row greedy; a top_p tensor takes
    the nucleus path for every row, a row at 1 keeps all): row r draws what it draws alone with its
    own numbers, the greedy rows linear_argmax's tokens."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    R, V, hidden, weight, seeds, offsets = _six_rows(generator_seed=31, key_seed=2)
    temperatures = torch.tensor([0.7, 0.0, 1.5, 1e-30, 0.0, 2.0])
    top_ps = torch.tensor([1.0, 0.5, 0.8, 1.0, 1.0, 0.3])
    greedy = linear_argmax(hidden, weight)
    for top_p in (1.0, top_ps):
        tokens = linear_sample(hidden, weight, temperature=temperatures, top_p=top_p, seeds=seeds, offsets=offsets)
        for r in range(R):
            alone = linear_sample(hidden[r:r + 1], weight, temperature=float(temperatures[r]),
                                  top_p=float(top_p[r]) if isinstance(top_p, torch.Tensor) else top_p,
                                  seeds=seeds[r:r + 1], offsets=offsets[r:r + 1])
            assert tokens[r] == alone[0], (r, top_p)
        assert tokens[1] == greedy[1] and tokens[4] == greedy[4]
    scalar = linear_sample(hidden, weight, temperature=0.9, top_p=0.8, seeds=seeds, offsets=offsets)
    as_rows = linear_sample(hidden, weight, temperature=torch.full((R,), 0.9), top_p=torch.full((R,), 0.8),
                            seeds=seeds, offsets=offsets)
    assert torch.equal(scalar, as_rows)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("view", ["every_other", "repeated"])
def test_per_row_values_as_strided_views_draw_what_contiguous_ones_draw(request, backend, view):
    """Per-row temperature, top_p, top_k, min_p, seeds and offsets may be views: every other element of a
    buffer whose other elements would change the draw, or one value repeated at stride 0 (how
    verify_tokens repeats a batch of one's values for each tree node). The kernel once read
    temperatures as if contiguous: a stride-0 view read past its one element."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    g = torch.Generator().manual_seed(37)
    R, V, D = 5, 301, 16
    hidden, weight = torch.randn(R, D, generator=g), torch.randn(V, D, generator=g) * 0.5
    seeds, offsets = _keys(R, seed=4)
    values = {"temperature": torch.tensor([0.7, 1.3, 0.9, 2.0, 0.5]), "top_p": torch.tensor([1.0, 0.6, 0.9, 1.0, 0.4]),
              "top_k": torch.tensor([0, 5, 0, 40, 3]), "min_p": torch.tensor([0.0, 0.1, 0.3, 0.05, 0.2]),
              "seeds": seeds, "offsets": offsets}
    if view == "repeated":
        values = {name: value[2:3].clone() for name, value in values.items()}

    def as_view(value):
        if view == "repeated":
            return value.expand(R)
        buffer = torch.zeros(2 * R, dtype=value.dtype)   # temperature 0 (greedy), seed 0, top_k 0 between
        buffer[::2] = value
        return buffer[::2]

    for names in (("temperature", "seeds", "offsets"), tuple(values)):
        contiguous = {name: values[name].expand(R).contiguous() for name in names}
        views = {name: as_view(values[name]) for name in names}
        assert all(not views[name].is_contiguous() for name in names)
        expected = linear_sample(hidden, weight, **contiguous)
        assert torch.equal(linear_sample(hidden, weight, **views), expected), (view, names)


def test_a_row_at_top_p_1_keeps_its_rules_among_nuclei():
    """Several +inf logits: alone at top_p 1 the first wins (the kernel's Gumbel-max rule); beside
    a row with a nucleus (a top_p per row, the nucleus path for the call) it still does, and a greedy
    row still takes the argmax."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    logits[:, [7, 20]] = float("inf")
    seeds, offsets = _keys(3, seed=4)
    for r in range(3):
        alone = reference.sample_logits(logits[r:r + 1], 1.0, 1.0, seeds[r:r + 1], offsets[r:r + 1])
        assert alone.tolist() == [7]
    rows = reference.sample_logits(logits, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.5]), seeds, offsets)
    assert rows[:2].tolist() == [7, 7] and rows[2] in (7, 20)   # under a nucleus the +inf tokens share


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=torch.tensor([0.5, -1.0])), r"row 1: temperature must be a finite number >= 0"),
    (dict(temperature=torch.tensor([0.5, 1e-40])), r"row 1: temperature must be 0 \(greedy\) or at least"),
    (dict(temperature=torch.tensor([0.5, float("nan")])), "row 1: temperature must be"),
    (dict(temperature=1.0, top_p=torch.tensor([0.5, 0.0])), r"row 1: top_p must be a number in \(0, 1\]"),
    (dict(temperature=torch.tensor([1, 2])), r"temperature as a tensor must be floating, shape \(2,\)"),
    (dict(temperature=torch.ones(3)), r"temperature as a tensor must be floating, shape \(2,\).*\(3,\)"),
    (dict(temperature=1.0, top_p=torch.ones(2, device="meta")), "top_p is on meta but hidden is on cpu"),
    (dict(temperature=1.0, min_p=torch.tensor([0.5, 1.5])), r"row 1: min_p must be a number in \[0, 1\]"),
    (dict(temperature=1.0, min_p=torch.tensor([0, 1])), r"min_p as a tensor must be floating"),
    (dict(temperature=1.0, min_p=-0.1), r"min_p must be a number in \[0, 1\]"),
    (dict(temperature=1.0, min_p=float("nan")), r"min_p must be a number in \[0, 1\]"),
    (dict(temperature=1.0, min_p="0.1"), r"min_p must be a number in \[0, 1\]"),
])
def test_bad_per_row_sampling_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        linear_sample(torch.zeros(2, 4), torch.zeros(7, 4), **kwargs)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_keyed_draws_follow_softmax(request, use_kernel):
    """One row repeated under one seed and consecutive offsets (a sequence's positions): the draws
    are independent samples of softmax(logits / T), with and without a nucleus."""
    if use_kernel:
        request.getfixturevalue("triton_backend")
    hidden, weight = _one_vector_many_rows(3000, seed=9)
    seeds = torch.full((3000,), 12345, dtype=torch.int64)
    offsets = torch.arange(3000, dtype=torch.int64)
    probs = torch.softmax(_logits(hidden[:1], weight)[0] / 0.9, dim=0)
    counts = torch.bincount(linear_sample(hidden, weight, temperature=0.9, seeds=seeds, offsets=offsets),
                            minlength=weight.shape[0])
    assert _chi_square_p_value(counts, probs) > 1e-3
    kept = reference.nucleus(probs[None], 0.7)[0]
    tokens = linear_sample(hidden, weight, temperature=0.9, top_p=0.7, seeds=seeds, offsets=offsets)
    assert kept[tokens].all() and 1 < int(kept.sum()) < weight.shape[0]
    counts = torch.bincount(tokens, minlength=weight.shape[0])[kept]
    assert _chi_square_p_value(counts, probs[kept] / probs[kept].sum()) > 1e-3


@pytest.mark.parametrize("use_kernel", [True, False])
def test_top_k_draws_from_the_k_most_likely_then_their_nucleus(request, use_kernel):
    """top_k alone (no ties here): the draws follow the softmax renormalized over the k most likely tokens; with
    top_p: over the nucleus of that renormalized distribution (Hugging Face's and vLLM's order: the
    cut, then the nucleus), which keeps fewer tokens than the nucleus of the uncut distribution would
    (the other order would keep those). A k of the vocabulary or more, and 0, cut nothing: the
    Gumbel-max kernel's own tokens."""
    if use_kernel:
        request.getfixturevalue("triton_backend")
    n, k = 3000, 4
    hidden, weight = _one_vector_many_rows(n, seed=9)
    V = weight.shape[0]
    seeds, offsets = torch.full((n,), 777, dtype=torch.int64), torch.arange(n, dtype=torch.int64)
    probs = torch.softmax(_logits(hidden[:1], weight)[0] / 0.9, dim=0)
    top = torch.topk(probs, k).indices
    tokens = linear_sample(hidden, weight, temperature=0.9, top_k=k, seeds=seeds, offsets=offsets)
    assert torch.isin(tokens, top).all()
    counts = torch.bincount(tokens, minlength=V)[top]
    assert _chi_square_p_value(counts, probs[top] / probs[top].sum()) > 1e-3
    # the nucleus of the renormalized top k: fewer tokens than the nucleus of probs (3 of 13 here)
    renormalized = torch.zeros_like(probs).index_put_((top,), probs[top] / probs[top].sum())
    kept = reference.nucleus(renormalized[None], 0.6)[0] & (renormalized > 0)
    assert 1 < int(kept.sum()) < int(reference.nucleus(probs[None], 0.6)[0].sum()) <= k
    tokens = linear_sample(hidden, weight, temperature=0.9, top_k=k, top_p=0.6, seeds=seeds, offsets=offsets)
    assert kept[tokens].all()
    counts = torch.bincount(tokens, minlength=V)[kept]
    assert _chi_square_p_value(counts, probs[kept] / probs[kept].sum()) > 1e-3
    free = linear_sample(hidden[:64], weight, temperature=0.9, seeds=seeds[:64], offsets=offsets[:64])
    for no_cut in (0, V, V + 5, np.int64(0)):
        assert torch.equal(linear_sample(hidden[:64], weight, temperature=0.9, top_k=no_cut, seeds=seeds[:64],
                                         offsets=offsets[:64]), free)
    one = linear_sample(hidden[:64], weight, temperature=5.0, top_k=1, seeds=seeds[:64], offsets=offsets[:64])
    assert torch.equal(one, linear_argmax(hidden[:64], weight))   # k = 1 is greedy, at any temperature


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_per_row_top_k_equals_each_row_alone(request, backend):
    """top_k as an (R,) integer tensor beside per-row temperature and top_p: each row draws what it
    draws alone with its own numbers (0 and V cut nothing; a greedy row stays greedy)."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    R, V, hidden, weight, seeds, offsets = _six_rows(generator_seed=32, key_seed=3)
    temperatures = torch.tensor([0.7, 0.0, 1.5, 2.0, 1.0, 2.0])
    top_ps = torch.tensor([1.0, 0.5, 0.8, 1.0, 1.0, 0.9])
    top_ks = torch.tensor([3, 2, 0, V, 1, 40], dtype=torch.int32)
    tokens = linear_sample(hidden, weight, temperature=temperatures, top_p=top_ps, top_k=top_ks, seeds=seeds,
                           offsets=offsets)
    for r in range(R):
        alone = linear_sample(hidden[r:r + 1], weight, temperature=float(temperatures[r]), top_p=float(top_ps[r]),
                              top_k=int(top_ks[r]), seeds=seeds[r:r + 1], offsets=offsets[r:r + 1])
        assert tokens[r] == alone[0], r
    greedy = linear_argmax(hidden, weight)
    assert tokens[1] == greedy[1] and tokens[4] == greedy[4]
    logits = _logits(hidden, weight)
    assert logits[0, tokens[0]] >= logits[0].topk(3).values[-1]


@pytest.mark.parametrize("use_kernel", [True, False])
def test_min_p_draws_the_tokens_at_least_min_p_times_as_likely_as_the_best(request, use_kernel):
    """min_p alone: the draws follow the softmax (at the temperature) renormalized over the tokens whose
    probability is at least min_p times the most likely one's, float64's rule; with top_k the two cuts
    commute (both keep the best token) and with top_p the nucleus is taken of what they keep. 0 cuts
    nothing (the Gumbel-max kernel's own tokens), 1 keeps the best token alone (greedy here)."""
    if use_kernel:
        request.getfixturevalue("triton_backend")
    n, min_p = 3000, 0.2
    hidden, weight = _one_vector_many_rows(n, seed=9)
    V = weight.shape[0]
    seeds, offsets = torch.full((n,), 4242, dtype=torch.int64), torch.arange(n, dtype=torch.int64)
    probs = torch.softmax(hidden[:1].double() @ weight.double().T / 0.9, dim=1)[0]
    kept = probs >= min_p * probs.max()
    assert ((probs / probs.max() - min_p).abs() > 1e-3).all()   # no token near the threshold
    assert 2 < int(kept.sum()) < V
    tokens = linear_sample(hidden, weight, temperature=0.9, min_p=min_p, seeds=seeds, offsets=offsets)
    assert kept[tokens].all()
    counts = torch.bincount(tokens, minlength=V)[kept]
    assert _chi_square_p_value(counts, (probs[kept] / probs[kept].sum()).float()) > 1e-3
    # with a nucleus: of the renormalized min-p cut (fewer tokens than the cut, more than one)
    renormalized = torch.where(kept, probs, 0.0) / probs[kept].sum()
    nucleus = reference.nucleus(renormalized[None].float(), 0.6)[0] & kept
    assert 1 < int(nucleus.sum()) < int(kept.sum())
    tokens = linear_sample(hidden, weight, temperature=0.9, min_p=min_p, top_p=0.6, seeds=seeds, offsets=offsets)
    assert nucleus[tokens].all()
    # the cuts commute: top_k 2 with min_p keeps the 2 best (both above the threshold)
    both = linear_sample(hidden[:200], weight, temperature=0.9, min_p=min_p, top_k=2, seeds=seeds[:200],
                         offsets=offsets[:200])
    assert torch.equal(both, linear_sample(hidden[:200], weight, temperature=0.9, top_k=2, seeds=seeds[:200],
                                           offsets=offsets[:200]))
    free = linear_sample(hidden[:64], weight, temperature=0.9, seeds=seeds[:64], offsets=offsets[:64])
    for no_cut in (0, 0.0, np.float32(0)):
        assert torch.equal(linear_sample(hidden[:64], weight, temperature=0.9, min_p=no_cut, seeds=seeds[:64],
                                         offsets=offsets[:64]), free)
    best = linear_sample(hidden[:64], weight, temperature=5.0, min_p=1.0, seeds=seeds[:64], offsets=offsets[:64])
    assert torch.equal(best, linear_argmax(hidden[:64], weight))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_per_row_min_p_equals_each_row_alone(request, backend):
    """min_p as an (R,) float tensor beside per-row temperature, top_p and top_k: each row draws what it
    draws alone with its own numbers (0 cuts nothing; a greedy row stays greedy)."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    R, V, hidden, weight, seeds, offsets = _six_rows(generator_seed=33, key_seed=5)
    temperatures = torch.tensor([0.7, 0.0, 1.5, 2.0, 1.0, 2.0])
    top_ps = torch.tensor([1.0, 0.5, 0.8, 1.0, 1.0, 0.9])
    top_ks = torch.tensor([0, 2, 0, 40, 0, 0])
    min_ps = torch.tensor([0.1, 0.5, 0.0, 0.05, 1.0, 0.3])
    for top_p, top_k in ((1.0, 0), (top_ps, top_ks)):
        tokens = linear_sample(hidden, weight, temperature=temperatures, top_p=top_p, top_k=top_k, min_p=min_ps,
                               seeds=seeds, offsets=offsets)
        for r in range(R):
            alone = linear_sample(hidden[r:r + 1], weight, temperature=float(temperatures[r]),
                                  top_p=reference.row_values(top_p, slice(r, r + 1)),
                                  top_k=reference.row_values(top_k, slice(r, r + 1)), min_p=float(min_ps[r]),
                                  seeds=seeds[r:r + 1], offsets=offsets[r:r + 1])
            assert tokens[r] == alone[0], (r, top_p)
        greedy = linear_argmax(hidden, weight)
        assert tokens[1] == greedy[1] and tokens[4] == greedy[4]   # greedy, and min_p 1
    free = linear_sample(hidden, weight, temperature=temperatures, seeds=seeds, offsets=offsets)
    assert torch.equal(linear_sample(hidden, weight, temperature=temperatures, min_p=torch.zeros(R), seeds=seeds,
                                     offsets=offsets), free)


def test_top_k_keeps_every_token_tied_with_the_kth():
    """Ties with the k-th score all stay (Hugging Face's and vLLM's cut): [3, 3, 3, 1] at top_k 1 or
    2 draws tokens 0, 1, 2 about equally, never 3; a per-row tensor does the same, with or without a
    max_top_k bound (torch.topk of that many instead of a sort)."""
    n = 3000
    logits = torch.tensor([[3.0, 3.0, 3.0, 1.0]]).repeat(n, 1)
    seeds, offsets = torch.full((n,), 7, dtype=torch.int64), torch.arange(n, dtype=torch.int64)
    for top_k, bound in ((1, None), (2, None), (torch.full((n,), 1), None), (torch.full((n,), 2), 2)):
        counts = torch.bincount(reference.sample_logits(logits, 1.0, 1.0, seeds, offsets, top_k, bound), minlength=4)
        assert counts[3] == 0 and _chi_square_p_value(counts[:3], torch.full((3,), 1 / 3)) > 1e-3, (top_k, counts)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_max_top_k_bound_changes_no_token(request, backend):
    """max_top_k (a host bound on a top_k tensor's values, which the Generator passes) takes the k-th
    score from torch.topk of that many instead of a sort: the same tokens, rows at 0 and at V or more
    uncut; a row above the bound is refused on the CPU, and a bad bound always."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    g = torch.Generator().manual_seed(40)
    R, V, D = 8, 301, 16
    hidden, weight = torch.randn(R, D, generator=g), torch.randn(V, D, generator=g) * 0.5
    seeds, offsets = _keys(R, seed=5)
    top_ks = torch.tensor([3, 0, 8, 1, V, 5, 0, 7])
    want = linear_sample(hidden, weight, temperature=1.5, top_k=top_ks, seeds=seeds, offsets=offsets)
    for bound in (8, 9, 64, V, 1000):
        assert torch.equal(linear_sample(hidden, weight, temperature=1.5, top_k=top_ks, max_top_k=bound,
                                         seeds=seeds, offsets=offsets), want), bound
    with pytest.raises(ValueError, match="row 2: top_k 8 is above max_top_k 4"):
        linear_sample(hidden, weight, temperature=1.5, top_k=top_ks, max_top_k=4, seeds=seeds, offsets=offsets)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_top_k must be None or an int >= 1"):
            linear_sample(hidden, weight, temperature=1.5, top_k=top_ks, max_top_k=bad, seeds=seeds, offsets=offsets)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=-1), r"top_k must be an int >= 0 \(0 = no cut\), got -1"),
    (dict(top_k=2.0), "top_k must be an int >= 0"),
    (dict(top_k=True), "top_k must be an int >= 0"),
    (dict(top_k=torch.tensor([1, -3])), r"row 1: top_k must be an int >= 0"),
    (dict(top_k=torch.tensor([1.0, 2.0])), r"top_k as a tensor must be integer, shape \(2,\)"),
    (dict(top_k=torch.ones(3, dtype=torch.int64)), r"top_k as a tensor must be integer, shape \(2,\).*\(3,\)"),
    (dict(top_k=torch.ones(2, dtype=torch.int64, device="meta")), "top_k is on meta but hidden is on cpu"),
])
def test_bad_top_k(kwargs, match):
    for temperature in (1.0, 0.0):   # checked when greedy too
        with pytest.raises(ValueError, match=match):
            linear_sample(torch.zeros(2, 4), torch.zeros(7, 4), temperature=temperature, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(seeds=torch.zeros(2, dtype=torch.int64)), "seeds and offsets go together"),
    (dict(offsets=torch.zeros(2, dtype=torch.int64)), "seeds and offsets go together"),
    (dict(seeds=torch.zeros(2, dtype=torch.int64), offsets=torch.zeros(2, dtype=torch.int64),
          generator=torch.Generator()), "not both"),
    (dict(seeds=torch.zeros(2, dtype=torch.int32), offsets=torch.zeros(2, dtype=torch.int64)),
     r"seeds must be an int64 tensor of shape \(2,\).*torch.int32"),
    (dict(seeds=torch.zeros(2, dtype=torch.int64), offsets=torch.zeros(3, dtype=torch.int64)),
     r"offsets must be an int64 tensor of shape \(2,\).*\(3,\)"),
    (dict(seeds=[1, 2], offsets=torch.zeros(2, dtype=torch.int64)), "seeds must be an int64 tensor.*list"),
    (dict(seeds=torch.zeros(2, dtype=torch.int64, device="meta"), offsets=torch.zeros(2, dtype=torch.int64)),
     "seeds is on meta but hidden is on cpu"),
])
def test_bad_keys(kwargs, match):
    for temperature in (1.0, 0.0):   # checked when greedy too
        with pytest.raises(ValueError, match=match):
            linear_sample(torch.zeros(2, 4), torch.zeros(7, 4), temperature=temperature, **kwargs)


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden_shape,weight_shape,dtypes,match", [
    ((4,), (7, 4), (torch.float32, torch.float32), "hidden must be 2-D"),
    ((2, 4), (7, 4, 1), (torch.float32, torch.float32), "weight must be 2-D"),
    ((2, 4), (7, 5), (torch.float32, torch.float32), "disagree on D"),
    ((2, 4), (0, 4), (torch.float32, torch.float32), "V = 0"),
    ((2, 4), (7, 4), (torch.float32, torch.float16), "hidden dtype torch.float32 != weight dtype"),
    ((2, 4), (7, 4), (torch.int64, torch.int64), "hidden dtype must be"),
])
def test_bad_shapes_and_dtypes(hidden_shape, weight_shape, dtypes, match):
    hidden = torch.zeros(hidden_shape, dtype=dtypes[0])
    weight = torch.zeros(weight_shape, dtype=dtypes[1])
    with pytest.raises(ValueError, match=match):
        linear_argmax(hidden, weight)
    with pytest.raises(ValueError, match=match):
        linear_sample(hidden, weight, temperature=1.0)


def test_bad_device():
    with pytest.raises(ValueError, match="hidden on cpu, weight on meta"):
        linear_argmax(torch.zeros(2, 4), torch.zeros(7, 4, device="meta"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.5), "temperature must be"),
    (dict(temperature=float("nan")), "temperature must be"),
    (dict(temperature=True), "temperature must be"),
    (dict(temperature=1.0, top_p=0.0), "top_p must be"),
    (dict(temperature=1.0, top_p=1.5), "top_p must be"),
    (dict(temperature=1.0, generator=123), "generator must be a torch.Generator"),
])
def test_bad_sampling_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        linear_sample(torch.zeros(2, 4), torch.zeros(7, 4), **kwargs)


def test_meta_tensors_give_shapes_and_no_rows_draw_nothing():
    hidden, weight = torch.zeros(3, 4, device="meta"), torch.zeros(7, 4, device="meta")
    seeds, offsets = (torch.zeros(3, dtype=torch.int64, device="meta") for _ in range(2))
    for top_p in (1.0, 0.9):
        assert linear_sample(hidden, weight, temperature=1.0, top_p=top_p).shape == (3,)
        assert linear_sample(hidden, weight, temperature=1.0, top_p=top_p, seeds=seeds, offsets=offsets).shape == (3,)
    gen = torch.Generator().manual_seed(4)
    state = gen.get_state()
    assert linear_sample(torch.zeros(0, 4), torch.zeros(7, 4), temperature=1.0, generator=gen).shape == (0,)
    assert torch.equal(gen.get_state(), state)


def test_generator_on_another_device():
    with pytest.raises(ValueError, match="generator is on cpu but hidden is on meta"):
        linear_sample(torch.zeros(2, 4, device="meta"), torch.zeros(7, 4, device="meta"), temperature=1.0,
                      generator=torch.Generator())


# --------------------------------------------------------------------------------------------
# GPU (bf16, compiled kernels): run by benchmarks/gpu_check.sh
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("R", [1, 7, 100, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_argmax_matches_reference(R, dtype):
    gen = torch.Generator(device="cuda").manual_seed(R)
    V, D = 32000, 4096
    hidden = torch.randn(R, D, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(V, D, device="cuda", generator=gen) * 0.02).to(dtype)
    logits = _logits(hidden, weight)
    _assert_argmax_of(linear_argmax(hidden, weight), logits, tol=1e-3)


@pytest.mark.gpu
def test_gpu_argmax_llama3_vocabulary_one_row():
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(1, 4096, device="cuda", generator=gen, dtype=torch.bfloat16)
    weight = torch.randn(128256, 4096, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
    _assert_argmax_of(linear_argmax(hidden, weight), _logits(hidden, weight), tol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_gpu_sampling_follows_softmax(top_p):
    gen = torch.Generator(device="cuda").manual_seed(1)
    V, D, n = 13, 64, 20000
    hidden = torch.randn(1, D, device="cuda", generator=gen).repeat(n, 1).bfloat16()
    weight = (torch.randn(V, D, device="cuda", generator=gen) * 0.15).bfloat16()
    tokens = linear_sample(hidden, weight, temperature=0.9, top_p=top_p, generator=gen)
    probs = torch.softmax(_logits(hidden[:1], weight)[0] / 0.9, dim=0).cpu()
    sorted_probs, order = torch.sort(probs, descending=True)
    n_kept = int(((torch.cumsum(sorted_probs, 0) - sorted_probs) <= top_p).sum())
    counts = torch.bincount(tokens.cpu(), minlength=V)
    assert counts[order[n_kept:]].sum() == 0
    kept = sorted_probs[:n_kept]
    assert _chi_square_p_value(counts[order[:n_kept]], kept / kept.sum()) > 1e-3


@pytest.mark.gpu
def test_gpu_keyed_noise_and_draws_equal_the_reference():
    """The compiled kernel's Philox is the reference's bit for bit (on the CPU in numpy, on CUDA in
    int64 torch ops), and its keyed bf16 draws are the reference's wherever no two scores tie."""
    R, V = 64, 32000
    seeds, offsets = (t.cuda() for t in _keys(R, seed=7))
    out = torch.empty(R, V, device="cuda")
    _uniforms_kernel[(triton.cdiv(R, 16), triton.cdiv(V, 128))](
        torch.stack([seeds, torch.zeros_like(seeds)], dim=1).flatten(), offsets, out, R, V, BLOCK_R=16, BLOCK_V=128)
    assert torch.equal(out, reference.sampling_uniforms(seeds, offsets, V))
    assert torch.equal(out.cpu(), reference.sampling_uniforms(seeds.cpu(), offsets.cpu(), V))
    gen = torch.Generator(device="cuda").manual_seed(8)
    hidden = torch.randn(R, 1024, device="cuda", generator=gen, dtype=torch.bfloat16)
    weight = torch.randn(V, 1024, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.03
    for top_p in (1.0, 0.9):
        tokens = linear_sample(hidden, weight, temperature=0.8, top_p=top_p, seeds=seeds, offsets=offsets)
        want = reference.linear_sample(hidden, weight, temperature=0.8, top_p=top_p, seeds=seeds, offsets=offsets)
        assert (tokens != want).sum() <= 1, top_p   # float32 sums in another order: a rare near-tie


@pytest.mark.gpu
def test_gpu_sampling_reproducible_and_graph_capturable():
    gen = torch.Generator(device="cuda").manual_seed(2)
    hidden = torch.randn(64, 1024, device="cuda", generator=gen, dtype=torch.bfloat16)
    weight = torch.randn(32000, 1024, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.05
    first = linear_sample(hidden, weight, temperature=1.0, generator=torch.Generator(device="cuda").manual_seed(3))
    again = linear_sample(hidden, weight, temperature=1.0, generator=torch.Generator(device="cuda").manual_seed(3))
    assert torch.equal(first, again)
    # The seed never visits the host, so the step can be captured in a CUDA graph (global RNG).
    linear_sample(hidden, weight, temperature=1.0)            # compile outside the capture
    linear_argmax(hidden, weight)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sampled = linear_sample(hidden, weight, temperature=1.0)
        greedy = linear_argmax(hidden, weight)
    graph.replay()
    torch.cuda.synchronize()
    _assert_argmax_of(greedy, _logits(hidden, weight), tol=1e-3)
    assert ((sampled >= 0) & (sampled < 32000)).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_selection_inside_torch_compile_equals_eager(backend, request):
    """A compiled function around the selection kernels: their Triton launches run as their own eager
    calls (Dynamo traced into the interpreter's numpy and failed) and choose eager's tokens."""
    import torch._dynamo

    if backend == "triton":
        request.getfixturevalue("triton_backend")
    torch._dynamo.reset()
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 16), torch.randn(37, 16)

    seeds, offsets = _keys(3)

    def pick(h):
        return (linear_argmax(torch.tanh(h), weight), linear_topk(torch.tanh(h), weight, 3),
                linear_sample(torch.tanh(h), weight, temperature=0.7, seeds=seeds, offsets=offsets),
                linear_sample(torch.tanh(h), weight, temperature=0.7, top_p=0.8, seeds=seeds, offsets=offsets))
    for got, want in zip(torch.compile(pick, backend="aot_eager")(hidden), pick(hidden)):
        assert torch.equal(got, want)

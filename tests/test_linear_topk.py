"""linear_topk / linear_candidates (kernels/sampling.py): a drafter's top-k tokens without the logits.

Triton kernels interpreted on CPU against the reference (float32 logits ranked by
reference.top_k_positions), which is itself checked against a stable sort in float64. Integer-valued
inputs make every logit exact in any summation order, so ties are real ties and results must be
equal; random inputs are compared with a tolerance for the summation order."""
import math

import pytest
import torch

from mtp_kernels import TokenCandidates, linear_argmax, linear_candidates, linear_sample, linear_topk, reference
from mtp_kernels import sampling


def _stable_topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The oracle: descending, equal values in id order (a stable sort in float64)."""
    return torch.sort(logits.double(), dim=1, descending=True, stable=True).indices[:, :k]


def _integer_inputs(R, V, D, dtype, seed, spread=2):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-spread, spread + 1, (R, D), generator=gen).to(dtype)
    weight = torch.randint(-1, 2, (V, D), generator=gen).to(dtype)
    return hidden, weight


def _assert_topk_of(ids, logits, k, tol):
    """ids (R, k) hold k distinct tokens whose logits are the row's k largest, in order, up to the
    float32 summation-order noise tol; where the k-th value beats the next by more than tol, the set
    equals the oracle's."""
    R = logits.shape[0]
    assert ids.shape == (R, k) and ids.dtype == torch.int64
    assert all(len(set(row.tolist())) == k for row in ids)
    expected_values = torch.sort(logits.double(), dim=1, descending=True).values
    chosen = logits.double().gather(1, ids)
    assert torch.allclose(chosen, expected_values[:, :k], atol=tol, rtol=0)
    if k < logits.shape[1]:
        clear = expected_values[:, k - 1] - expected_values[:, k] > tol
        expected = _stable_topk(logits, k)
        for r in torch.nonzero(clear).flatten().tolist():
            assert set(ids[r].tolist()) == set(expected[r].tolist())


# --------------------------------------------------------------------------------------------
# The ranking rule (reference.top_k_positions)
# --------------------------------------------------------------------------------------------
def test_top_k_positions_is_a_stable_descending_sort():
    gen = torch.Generator().manual_seed(0)
    for scores in (torch.randn(5, 1000, generator=gen),
                   torch.randint(-3, 4, (7, 257), generator=gen).float(),        # ties everywhere
                   torch.randn(3, 40, generator=gen) * 1e30,                      # very large values
                   torch.full((2, 9), -float("inf"))):                            # nothing but -inf
        for k in (1, 3, scores.shape[1]):
            expected = _stable_topk(scores, k)
            assert torch.equal(reference.top_k_positions(scores, k), expected)
            # The keys route (CUDA's, and the CPU's when the k-th score has an equal outside the k)
            assert torch.equal(reference._top_k_positions_by_keys(scores, k), expected)


def test_top_k_positions_signed_zero_infinities_and_nan():
    scores = torch.tensor([[1.0, 3.0, 3.0, -0.0, 0.0, float("nan"), -2.0, 3.0, float("inf"), -float("inf")]])
    # -0.0 equals +0.0 (id order decides); NaN counts as -inf.
    assert reference.top_k_positions(scores, 10).tolist() == [[8, 1, 2, 7, 0, 3, 4, 6, 5, 9]]


# --------------------------------------------------------------------------------------------
# linear_topk: kernel (interpreted) and reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("R,V,D,k", [(1, 1001, 33, 1), (3, 1001, 33, 4), (37, 300, 16, 10), (2, 100, 32, 16),
                                     (2, 100, 32, 17), (4, 16, 8, 16)])
def test_topk_equals_a_stable_sort_on_exact_logits(triton_backend, dtype, R, V, D, k):
    # k = 16: the widest the kernel extracts per tile; 17 goes through written logits; V = k: all.
    hidden, weight = _integer_inputs(R, V, D, dtype, seed=R * 31 + V + k)
    expected = _stable_topk(hidden.double() @ weight.double().T, k)
    assert torch.equal(linear_topk(hidden, weight, k), expected)
    assert torch.equal(reference.linear_topk(hidden, weight, k), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("R,V,D,k", [(1, 4097, 64, 4), (37, 1001, 64, 8)])
def test_topk_random_inputs(triton_backend, dtype, R, V, D, k):
    gen = torch.Generator().manual_seed(V + k)
    hidden = torch.randn(R, D, generator=gen).to(dtype)
    weight = torch.randn(V, D, generator=gen).to(dtype)
    logits = hidden.double() @ weight.double().T
    _assert_topk_of(linear_topk(hidden, weight, k), logits, k, tol=1e-4 * math.sqrt(D))
    _assert_topk_of(reference.linear_topk(hidden, weight, k), logits, k, tol=1e-4 * math.sqrt(D))


def test_topk_planted_ties_across_blocks_and_large_logits(triton_backend):
    # Tokens 5, 9 (one vocab block), 70 and V - 1 (later blocks) share the maximum; 3 and 200 share
    # the runner-up. Logits around 2^20: exact in float32, far beyond any softmax's comfort.
    R, V, D = 5, 1001, 16
    hidden, weight = _integer_inputs(R, V, D, torch.float32, seed=3, spread=1)
    hidden[:, 0] = 2.0 ** 18
    weight[:, 0] = 0.0
    weight[[5, 9, 70, V - 1], 0] = 4.0
    weight[[3, 200], 0] = 3.0
    weight[[3, 5, 9, 70, 200, V - 1], 1:] = 0.0
    ids = linear_topk(hidden, weight, 6)
    assert ids.tolist() == [[5, 9, 70, V - 1, 3, 200]] * R


def test_topk_strided_rows_and_empty(triton_backend):
    hidden, weight = _integer_inputs(6, 300, 24, torch.float32, seed=4)
    wide = torch.cat([hidden, torch.zeros(6, 8)], dim=1)[:, :24]       # row stride 32, unit column stride
    assert torch.equal(linear_topk(wide, weight, 5), _stable_topk(hidden.double() @ weight.double().T, 5))
    assert linear_topk(hidden[:0], weight, 3).shape == (0, 3)
    assert linear_candidates(hidden[:0], weight, 3).topk(3).shape == (0, 3)


# --------------------------------------------------------------------------------------------
# linear_candidates: one weight read for a verifier's argmax and a drafter's top-k
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("k", [1, 4, 17])
def test_candidates_serve_argmax_topk_and_row_subsets(request, use_kernel, k):
    if use_kernel:
        request.getfixturevalue("triton_backend")
    R, V, D = 12, 1001, 33
    hidden, weight = _integer_inputs(R, V, D, torch.float32, seed=k)
    logits = hidden.double() @ weight.double().T
    candidates = linear_candidates(hidden, weight, k)
    assert isinstance(candidates, TokenCandidates)
    assert torch.equal(candidates.argmax(), torch.argmax(logits, dim=1))
    assert torch.equal(candidates.argmax(), linear_argmax(hidden, weight))
    for j in sorted({1, k // 2 or 1, k}):
        assert torch.equal(candidates.topk(j), _stable_topk(logits, j))
    rows = torch.tensor([[7, 0, 3], [11, 7, 7]])
    assert torch.equal(candidates.topk(k, rows), _stable_topk(logits[rows.flatten()], k).view(2, 3, k))
    assert torch.equal(candidates.argmax(rows), torch.argmax(logits, dim=1)[rows])
    for bad in (k + 1, 0, True, 2.0):
        with pytest.raises(ValueError, match=rf"k must be an int in \[1, {k}\] .* got {bad!r}"):
            candidates.topk(bad)
    with pytest.raises(ValueError, match=r"row ids must be in \[0, 12\), got 0..12"):
        candidates.argmax(torch.tensor([0, 12]))
    with pytest.raises(ValueError, match="rows must be an int32/int64 tensor"):
        candidates.topk(1, torch.tensor([0.0]))


def test_kernel_keeps_each_blocks_best_in_order(triton_backend, monkeypatch):
    # Pass 1 alone: per vocab block, the block's top-k ids best first (ties in id order).
    hidden, weight = _integer_inputs(3, 200, 16, torch.float32, seed=5)
    score, index = sampling.linear_select_partials_triton(hidden, weight, 0.0, None, top_k=3)
    logits = hidden @ weight.T
    block = sampling._launch_config(3, torch.float32, hidden.device)["BLOCK_V"]
    assert score.shape == index.shape == (3, math.ceil(200 / block), 3)
    for b in range(score.shape[1]):
        cols = logits[:, b * block:(b + 1) * block]
        expected = _stable_topk(cols, 3) + b * block
        assert torch.equal(index[:, b].long(), expected)
        assert torch.equal(score[:, b], cols.gather(1, expected - b * block))


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_merge_kernel_ranks_candidates_like_the_torch_route(triton_backend, id_dtype):
    """Pass 2's kernel (one program per row, rows picked by id or all) against
    reference.top_k_positions on hand-made candidates: ties by position, NaN as -inf, -0.0 equal to
    +0.0, and each block's first rank alone for an argmax."""
    gen = torch.Generator().manual_seed(13)
    R, n_blocks, kept = 9, 37, 3
    score = torch.randint(-3, 4, (R, n_blocks, kept), generator=gen).float()
    score[0, 5, 1], score[1, :, :] = float("nan"), -0.0
    score[1, 7, 2] = 0.0
    index = torch.randperm(R * n_blocks * kept, generator=gen).view(R, n_blocks, kept).to(id_dtype)
    candidates = TokenCandidates(score, index)
    flat_score, flat_index = score.reshape(R, -1), index.reshape(R, -1).long()
    for k in (1, 2, kept):
        expected = flat_index.gather(1, reference.top_k_positions(flat_score, k))
        assert torch.equal(candidates.topk(k), expected)
        rows = torch.tensor([[8, 0], [1, 1]])
        assert torch.equal(candidates.topk(k, rows), expected[rows.flatten()].view(2, 2, k))
    firsts = index[:, :, 0].long().gather(1, reference.top_k_positions(score[:, :, 0], 1)).squeeze(1)
    assert torch.equal(candidates.argmax(), firsts)
    assert torch.equal(candidates.argmax(torch.tensor([3, 3, 2])), firsts[[3, 3, 2]])


def test_every_many_row_tile_gives_the_same_candidates(triton_backend):
    """Each tile the tuner may pick past 64 rows (and the fixed rule's) selects the same tokens,
    under the interpreter: the tile changes the grid, not the answer."""
    R, V, D = 70, 600, 64
    hidden, weight = _integer_inputs(R, V, D, torch.float32, seed=21)
    logits = hidden.double() @ weight.double().T
    for tile in (sampling.SelectTile(16, 64, 32, 1, 1), *sampling._GPU_MANY_ROW_TILES):
        score, index = sampling._select_launch(hidden, weight, 0.0, None, 5, tile)
        candidates = TokenCandidates(score, index)
        assert score.shape == (R, math.ceil(V / tile.block_v), 5), tile
        assert torch.equal(candidates.topk(5), _stable_topk(logits, 5)), tile
        assert torch.equal(candidates.argmax(), torch.argmax(logits, dim=1)), tile


def test_selection_tuning(triton_backend, monkeypatch):
    """tune_select times every tile on rotating weight copies and keeps the fastest; a selection
    then launches the kept tile (a dict lookup); greedy only, and on the CPU one tile, no tuning."""
    from mtp_kernels.launch_tuner import LaunchTuner

    tuner = LaunchTuner("linear_select")
    monkeypatch.setattr(sampling, "_SELECT_TUNER", tuner)
    hidden, weight = _integer_inputs(20, 300, 32, torch.float32, seed=22)
    tiles = [sampling.SelectTile(16, 64, 32, 1, 1), sampling.SelectTile(32, 32, 32, 1, 1)]
    timed = iter([2.0, 1.0])

    def timer(fn):
        torch.testing.assert_close(TokenCandidates(*fn()).topk(3), _stable_topk(hidden.double() @ weight.double().T, 3),
                                   rtol=0, atol=0)
        return next(timed)
    key = ("cpu", torch.float32, 32, 300, 32, 3)
    times = sampling.tune_select(key, hidden, weight, 3, tiles, timer, l2_bytes=0)
    assert times == {tiles[0]: 2.0, tiles[1]: 1.0} and tuner.chosen[key] == tiles[1]
    assert sampling.select_tiles(200, torch.float32, hidden.device) == [
        sampling.SelectTile(16, 64, 32, 1, 1)]   # interpreter: the fixed rule's tile alone
    monkeypatch.setattr(sampling, "select_tiles", lambda *args: tiles)
    launched = []
    launch = sampling._select_launch
    monkeypatch.setattr(sampling, "_select_launch", lambda *args: launched.append(args[-1]) or launch(*args))
    linear_topk(hidden, weight, 3)
    linear_sample(hidden, weight, temperature=0.7)            # sampling keeps the fixed rule (None)
    assert launched == [tiles[1], None]


def test_selection_tuning_leaves_out_a_tile_that_selects_wrong_tokens(triton_backend, monkeypatch):
    """A tile whose partials name a worse token for one row (as a race in its reduction would) never
    wins, however fast it times; ties are not held against a tile (the check compares logits)."""
    from mtp_kernels.launch_tuner import LaunchTuner

    monkeypatch.setattr(sampling, "_SELECT_TUNER", LaunchTuner("linear_select"))
    hidden, weight = _integer_inputs(20, 300, 32, torch.float32, seed=24)
    weight[5] = weight[17] = 4 * hidden[0]      # row 0's best two tokens tie
    tiles = [sampling.SelectTile(16, 64, 32, 1, 1), sampling.SelectTile(32, 32, 32, 1, 1)]
    launch = sampling._select_launch

    def faulty(hidden_, weight_, temperature, generator, top_k, tile):
        score, index = launch(hidden_, weight_, temperature, generator, top_k, tile)
        if tile == tiles[1]:
            index[3] = torch.argmin(hidden_[3] @ weight_.T).to(index.dtype)   # row 3: the worst token
        return score, index
    monkeypatch.setattr(sampling, "_select_launch", faulty)
    key = ("cpu", torch.float32, 32, 300, 32, 3)
    with pytest.warns(UserWarning, match="disagree with the reference"):
        times = sampling.tune_select(key, hidden, weight, 3, tiles, lambda fn: (fn(), 1.0)[1], l2_bytes=0)
    assert times == {tiles[0]: 1.0, tiles[1]: float("inf")}
    agrees = sampling._selects_the_best(hidden, weight, 1, rows=7)
    logits = hidden @ weight.T
    best = torch.argmax(logits, dim=1, keepdim=True)
    assert agrees(best) and not agrees(torch.argmin(logits, dim=1, keepdim=True))
    for garbage in (10 ** 6, -1):   # an unwritten partial's ids: refused, not looked up
        assert not agrees(best.clone().fill_(garbage))
    assert int(best[0]) == 5
    best[0] = 17                                # the other of the tied pair
    assert agrees(best)


def test_nan_hidden_states_still_give_token_ids(triton_backend):
    """A NaN hidden row (a diverged model) must not turn into an id past the vocabulary, which the
    next embedding lookup would fault on: NaN logits count as -inf, so the row picks id 0."""
    hidden, weight = _integer_inputs(3, 100, 16, torch.float32, seed=23)
    hidden[1] = float("nan")
    weight[7] = float("nan")            # and one NaN logit in every row: it never wins
    tokens = linear_argmax(hidden, weight)
    logits = (hidden @ weight.T).nan_to_num(nan=float("-inf"))
    assert tokens[1] == 0 and torch.equal(tokens[[0, 2]], torch.argmax(logits[[0, 2]], dim=1))
    assert torch.equal(reference.linear_argmax(hidden, weight), tokens)   # the twin agrees
    top = linear_topk(hidden, weight, 4)
    assert ((top >= 0) & (top < 100)).all()
    assert torch.equal(top, reference.linear_topk(hidden, weight, 4))
    assert top[1].tolist() == [0, 1, 2, 3]   # distinct ids: a taken winner must not tie with the NaN rest
    # Fewer than k finite logits (two +inf, the rest -inf), at k = 4 and at the kernel's widest k:
    weight = torch.zeros(100, 16)
    weight[:, 0], weight[10, 0], weight[20, 0] = -1.0, 1.0, 1.0
    hidden = torch.zeros(1, 16)
    hidden[0, 0] = float("inf")
    for k in (4, sampling.MAX_KERNEL_TOP_K):
        top = linear_topk(hidden, weight, k)
        assert top[0].tolist() == [10, 20] + [i for i in range(k) if i not in (10, 20)][: k - 2], k
        assert torch.equal(top, reference.linear_topk(hidden, weight, k))
        assert torch.equal(linear_candidates(hidden, weight, k).topk(k), top)
    assert ((linear_sample(hidden, weight, temperature=1.0) >= 0) & (linear_sample(hidden, weight, temperature=1.0)
                                                                      < 100)).all()


@pytest.mark.parametrize("k,match", [(0, "k must be an int in"), (8, r"in \[1, V = 7\]"), (True, "got True"),
                                     (2.0, "got 2.0")])
def test_bad_k(k, match):
    for fn in (linear_topk, linear_candidates):
        with pytest.raises(ValueError, match=match):
            fn(torch.zeros(2, 4), torch.zeros(7, 4), k)


def test_bad_shapes_name_the_function():
    with pytest.raises(ValueError, match="linear_topk: hidden .* disagree on D"):
        linear_topk(torch.zeros(2, 4), torch.zeros(7, 5), 2)
    with pytest.raises(ValueError, match="linear_candidates: hidden dtype torch.float32 != weight dtype"):
        linear_candidates(torch.zeros(2, 4), torch.zeros(7, 4, dtype=torch.float16), 2)


# --------------------------------------------------------------------------------------------
# GPU (bf16, compiled kernels): run by benchmarks/gpu_check.sh
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("R,k", [(3, 4), (3, 16), (256, 4), (7, 40)])
def test_gpu_topk_and_shared_argmax(R, k):
    gen = torch.Generator(device="cuda").manual_seed(R + k)
    V, D = 32000, 4096
    hidden = torch.randn(R, D, device="cuda", generator=gen).bfloat16()
    weight = (torch.randn(V, D, device="cuda", generator=gen) * 0.02).bfloat16()
    logits = (hidden.double() @ weight.double().T).cpu()
    _assert_topk_of(linear_topk(hidden, weight, k).cpu(), logits, k, tol=1e-3)
    candidates = linear_candidates(hidden, weight, k)
    if R <= 64:   # the same tile code and config as linear_argmax's: the same winners, bit for bit
        assert torch.equal(candidates.argmax(), linear_argmax(hidden, weight))
    for tokens in (candidates.argmax(), linear_argmax(hidden, weight)):   # past 64 rows each its tuned tile
        _assert_topk_of(tokens.cpu()[:, None], logits, 1, tol=1e-3)


@pytest.mark.gpu
def test_gpu_topk_is_graph_capturable():
    gen = torch.Generator(device="cuda").manual_seed(9)
    hidden = torch.randn(3, 1024, device="cuda", generator=gen, dtype=torch.bfloat16)
    weight = torch.randn(32000, 1024, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.05
    eager = linear_topk(hidden, weight, 8)                 # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = linear_topk(hidden, weight, 8)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)

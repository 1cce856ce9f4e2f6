"""tree_accept and compact_kv_cache: Triton kernels (interpreted on CPU) against the references."""
import pytest
import torch

from mtp_kernels import compact_kv_cache, reference, tree_accept, tree_accept_tokens


def _random_parents(T, gen):
    """parents[0] = -1, parents[t] uniform in [0, t): every tree shape in node order."""
    parents = [-1] + [int(torch.randint(0, t, (1,), generator=gen)) for t in range(1, T)]
    return torch.tensor(parents, dtype=torch.int64)


def _children(parents):
    kids = [[] for _ in parents]
    for t, p in enumerate(parents[1:], start=1):
        kids[p].append(t)
    return kids


def _planted_acceptance(parents, B, gen, vocab=1000):
    """Candidates with distinct tokens among siblings, and a verifier that accepts a random root
    path of random length per sequence. Returns candidates, verifier, expected node paths."""
    T = len(parents)
    kids = _children(parents.tolist())
    candidates = torch.empty(B, T, dtype=torch.int64)
    verifier = torch.randint(0, vocab, (B, T), generator=gen)
    paths = []
    for b in range(B):
        candidates[b] = torch.randperm(vocab, generator=gen)[:T]        # all distinct
        path = [0]
        while kids[path[-1]] and torch.rand(1, generator=gen).item() < 0.8:
            options = kids[path[-1]]
            path.append(options[int(torch.randint(0, len(options), (1,), generator=gen))])
        for node, child in zip(path, path[1:]):
            verifier[b, node] = candidates[b, child]
        verifier[b, path[-1]] = vocab + b                                 # matches no candidate: stop
        paths.append(path)
    return candidates, verifier, paths


def _assert_same(outputs, expected):
    for got, want in zip(outputs, expected):
        assert got.dtype == want.dtype and torch.equal(got, want)


# --------------------------------------------------------------------------------------------
# tree_accept
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 5, 26, 64])
@pytest.mark.parametrize("B", [1, 3, 7])
def test_tree_accept_planted_paths(triton_backend, T, B):
    gen = torch.Generator().manual_seed(100 * T + B)
    parents = _random_parents(T, gen)
    candidates, verifier, paths = _planted_acceptance(parents, B, gen)
    accepted_nodes, accept_len, bonus = tree_accept(candidates, verifier, parents)
    max_depth = max(reference.tree_depths(parents))
    assert accepted_nodes.shape == (B, max_depth + 1)
    for b, path in enumerate(paths):
        assert accepted_nodes[b].tolist() == path + [-1] * (max_depth + 1 - len(path))
        assert accept_len[b] == len(path)
        assert bonus[b] == verifier[b, path[-1]]
    _assert_same((accepted_nodes, accept_len, bonus), reference.tree_accept(candidates, verifier, parents))


@pytest.mark.parametrize("T", [5, 26, 64])
def test_tree_accept_small_vocabulary_matches_reference(triton_backend, T):
    # Tokens from {0, 1, 2}: siblings collide all the time, so "first child wins" decides the path.
    gen = torch.Generator().manual_seed(T)
    parents = _random_parents(T, gen)
    candidates = torch.randint(0, 3, (7, T), generator=gen)
    verifier = torch.randint(0, 3, (7, T), generator=gen)
    out = tree_accept(candidates, verifier, parents)
    _assert_same(out, reference.tree_accept(candidates, verifier, parents))
    assert (out[1] > 1).any()


def test_tree_accept_full_depth_root_only_and_ties(triton_backend):
    # Root 0 with children 1, 2 (equal tokens: node 1 must win), 1 -> 3 -> 4 (a chain), 2 -> 5.
    parents = torch.tensor([-1, 0, 0, 1, 3, 2])
    candidates = torch.tensor([[50, 7, 7, 8, 9, 10],     # full depth through the first of the tied children
                               [50, 7, 7, 8, 9, 10],     # root only
                               [50, 6, 7, 8, 9, 10]])    # tie broken by the token: node 2, then node 5
    verifier = torch.tensor([[7, 8, 99, 9, 42, 0],
                             [3, 8, 99, 9, 42, 0],
                             [7, 8, 10, 9, 42, 43]])
    accepted_nodes, accept_len, bonus = tree_accept(candidates, verifier, parents)
    assert accepted_nodes.tolist() == [[0, 1, 3, 4], [0, -1, -1, -1], [0, 2, 5, -1]]
    assert accept_len.tolist() == [4, 1, 3]
    assert bonus.tolist() == [42, 3, 43]
    _assert_same((accepted_nodes, accept_len, bonus), reference.tree_accept(candidates, verifier, parents))


@pytest.mark.parametrize("T,B", [(1, 2), (5, 3), (26, 7), (64, 4)])
def test_tree_accept_tokens_lines_up_what_each_sequence_emits(triton_backend, T, B):
    """The kernel's packed rows [accept_len, the accepted drafts, the bonus, -1 ...] and last nodes,
    against the reference and against the path itself; planted paths, then tokens from {0, 1, 2}
    (siblings collide, paths of every length)."""
    gen = torch.Generator().manual_seed(T * 10 + B)
    parents = _random_parents(T, gen)
    max_depth = max(reference.tree_depths(parents))
    planted = _planted_acceptance(parents, B, gen)[:2]
    small = (torch.randint(0, 3, (B, T), generator=gen), torch.randint(0, 3, (B, T), generator=gen))
    for candidates, verifier in (planted, small):
        out = tree_accept_tokens(candidates, verifier, parents)
        _assert_same(out, reference.tree_accept_tokens(candidates, verifier, parents))
        accepted_nodes, packed, bonus, last_node = out
        assert packed.shape == (B, max_depth + 2)
        _assert_same((accepted_nodes, packed[:, 0], bonus), tree_accept(candidates, verifier, parents))
        for b in range(B):
            n = int(packed[b, 0])
            path = accepted_nodes[b, :n].tolist()
            assert packed[b, 1:].tolist() == ([int(candidates[b, t]) for t in path[1:]] + [int(bonus[b])]
                                              + [-1] * (max_depth + 1 - n))
            assert last_node[b] == path[-1]


def test_tree_accept_tokens_full_depth_and_root_only(triton_backend):
    parents = torch.tensor([-1, 0, 0, 1, 3, 2])
    candidates = torch.tensor([[50, 7, 7, 8, 9, 10], [50, 7, 7, 8, 9, 10]])
    verifier = torch.tensor([[7, 8, 99, 9, 42, 0], [3, 8, 99, 9, 42, 0]])
    accepted_nodes, packed, bonus, last_node = tree_accept_tokens(candidates, verifier, parents)
    assert packed.tolist() == [[4, 7, 8, 9, 42], [1, 3, -1, -1, -1]]   # full depth: the bonus in the last column
    assert last_node.tolist() == [4, 0] and bonus.tolist() == [42, 3]
    empty = tree_accept_tokens(candidates[:0], verifier[:0], parents)
    assert [tuple(t.shape) for t in empty] == [(0, 4), (0, 5), (0,), (0,)]
    with pytest.raises(ValueError, match="tree_accept_tokens: candidates and verifier must be int64"):
        tree_accept_tokens(candidates.int(), verifier, parents)


def test_tree_accept_int32_parents_strided_rows_and_empty_batch(triton_backend):
    gen = torch.Generator().manual_seed(3)
    parents = _random_parents(26, gen)
    candidates, verifier, _ = _planted_acceptance(parents, 4, gen)
    wide = torch.zeros(4, 40, dtype=torch.int64)
    wide[:, 3:29] = candidates
    out = tree_accept(wide[:, 3:29], verifier, parents.to(torch.int32))
    _assert_same(out, reference.tree_accept(candidates, verifier, parents))
    empty = tree_accept(candidates[:0], verifier[:0], parents)
    assert [tuple(t.shape) for t in empty] == [(0, max(reference.tree_depths(parents)) + 1), (0,), (0,)]


def test_tree_accept_column_strides(triton_backend):
    """Columns need not be adjacent: a verifier that is head 0's column of (B, T, heads) tokens
    (speculative.verify_and_score), candidates transposed, parents a strided view."""
    gen = torch.Generator().manual_seed(4)
    parents = _random_parents(19, gen)
    candidates, verifier, _ = _planted_acceptance(parents, 5, gen)
    per_head = torch.randint(0, 1000, (5, 19, 3), generator=gen)
    per_head[:, :, 0] = verifier
    transposed = candidates.T.contiguous().T                         # strides (1, B)
    spread_parents = torch.stack([parents, parents], dim=1)[:, 0]    # stride 2
    out = tree_accept(transposed, per_head[:, :, 0], spread_parents)
    _assert_same(out, reference.tree_accept(candidates, verifier, parents))


@pytest.mark.parametrize("parents,match", [
    ([0, 0, 1], r"parents\[0\] must be -1"),
    ([-1, 0, 2], r"parents\[2\] = 2"),
    ([-1, -1, 0], r"parents\[1\] = -1"),
])
def test_tree_accept_rejects_bad_trees(parents, match):
    tokens = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        tree_accept(tokens, tokens, torch.tensor(parents))


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_tree_accept_rechecks_a_parents_tensor_changed_in_place(request, path):
    if path == "triton":   # the path that caches a tree's depth
        request.getfixturevalue("triton_backend")
    parents = torch.tensor([-1, 0, 1])
    tokens = torch.zeros(2, 3, dtype=torch.int64)
    assert tree_accept(tokens, tokens, parents)[0].shape == (2, 3)
    parents[2] = 0                                   # depth 2 -> 1: the cached depth must not be reused
    assert tree_accept(tokens, tokens, parents)[0].shape == (2, 2)
    parents[2] = 7
    with pytest.raises(ValueError, match=r"parents\[2\] = 7"):
        tree_accept(tokens, tokens, parents)


def test_tree_accept_reads_a_tree_back_once(triton_backend, monkeypatch):
    # Later steps with the same parents tensor must not read it again (a host sync on GPU).
    from mtp_kernels import tree_verify

    reads = []
    original = reference.tree_depths
    monkeypatch.setattr(tree_verify.reference, "tree_depths", lambda p: reads.append(1) or original(p))
    gen = torch.Generator().manual_seed(4)
    # Inference tensors keep no version counter: an in-place change could not be seen, so they are
    # read at every call (outside a CUDA-graph capture), and a change to an invalid tree is caught.
    for make, reads_per_call in ((lambda: _random_parents(9, gen), 0),
                                 (lambda: _inference_tensor(_random_parents(9, gen)), 1)):
        reads.clear()
        parents = make()
        candidates, verifier, _ = _planted_acceptance(parents, 2, gen)
        first = tree_accept(candidates, verifier, parents)
        second = tree_accept(candidates, verifier, parents)
        assert len(reads) == 1 + reads_per_call
        _assert_same(first, second)
    with torch.inference_mode():
        parents = torch.tensor([-1, 0, 1, 2])
        tokens = torch.tensor([[5, 7, 8, 9]])
        tree_accept(tokens, tokens, parents)
        parents.copy_(torch.tensor([-1, 2, 0, 1]))   # in place: node 1's parent comes after it
        with pytest.raises(ValueError, match=r"parents\[1\] = 2"):
            tree_accept(tokens, tokens, parents)


def _inference_tensor(t):
    with torch.inference_mode():
        return t.clone()


def test_tree_accept_rejects_bad_shapes_dtypes_devices():
    tokens = torch.zeros(2, 3, dtype=torch.int64)
    parents = torch.tensor([-1, 0, 0])
    with pytest.raises(ValueError, match="candidates and verifier must both be"):
        tree_accept(tokens, tokens[:, :2], parents)
    with pytest.raises(ValueError, match="must be int64"):
        tree_accept(tokens.int(), tokens, parents)
    with pytest.raises(ValueError, match=r"parents must be \(T,\) = \(3,\)"):
        tree_accept(tokens, tokens, parents[:2])
    with pytest.raises(ValueError, match="parents must be int32 or int64"):
        tree_accept(tokens, tokens, parents.float())
    with pytest.raises(ValueError, match="must be on one device"):
        tree_accept(tokens, tokens.to("meta"), parents)


# --------------------------------------------------------------------------------------------
# compact_kv_cache
# --------------------------------------------------------------------------------------------
def _expected_compaction(k, cache_seqlens, accepted_nodes, accept_len):
    """Built from a copy of the untouched cache, so overlapping sources and destinations cannot mislead."""
    out = k.clone()
    for b in range(accepted_nodes.shape[0]):
        start = int(cache_seqlens[b])
        for j in range(int(accept_len[b])):
            out[:, b, start + j] = k[:, b, start + int(accepted_nodes[b, j])]
    return out


def _run_both(k, v, cache_seqlens, accepted_nodes, accept_len):
    """compact_kv_cache (dispatching) and the reference on copies; returns both results."""
    results = []
    for fn in (compact_kv_cache, reference.compact_kv_cache):
        kc, vc, sl = k.clone(), v.clone(), cache_seqlens.clone()
        fn(kc, vc, sl, accepted_nodes, accept_len)
        results.append((kc, vc, sl))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,B,Hkv,Dh", [(5, 1, 2, 8), (26, 3, 3, 5), (64, 7, 1, 16)])
def test_compaction_random_paths_near_the_cache_end(triton_backend, dtype, T, B, Hkv, Dh):
    gen = torch.Generator().manual_seed(T * 31 + B)
    L, B_max, S = 3, B + 2, T + 6
    parents = _random_parents(T, gen)
    candidates, verifier, _ = _planted_acceptance(parents, B, gen)
    accepted_nodes, accept_len, _ = tree_accept(candidates, verifier, parents)
    # Every start in [S - T - 6, S - T]: the tree ends at most 6 slots before the end, some right at it.
    cache_seqlens = torch.randint(S - T - 6, S - T + 1, (B_max,), generator=gen, dtype=torch.int32)
    cache_seqlens[0] = S - T
    k = torch.randn(L, B_max, S, Hkv, Dh, generator=gen).to(dtype)
    v = torch.randn(L, B_max, S, Hkv, Dh, generator=gen).to(dtype)
    (kc, vc, sl), (kr, vr, slr) = _run_both(k, v, cache_seqlens, accepted_nodes, accept_len)
    assert torch.equal(kc, kr) and torch.equal(vc, vr) and torch.equal(sl, slr)
    assert torch.equal(kc, _expected_compaction(k, cache_seqlens, accepted_nodes, accept_len))
    assert torch.equal(vc, _expected_compaction(v, cache_seqlens, accepted_nodes, accept_len))
    assert torch.equal(sl[:B], cache_seqlens[:B] + accept_len.int())
    assert torch.equal(sl[B:], cache_seqlens[B:])                     # rows >= B: untouched lengths
    assert torch.equal(kc[:, B:], k[:, B:])                           # ... and untouched caches
    for b in range(B):                                                # slots outside the accepted range
        start, n = int(cache_seqlens[b]), int(accept_len[b])
        assert torch.equal(kc[:, b, :start + n], kr[:, b, :start + n])
        assert torch.equal(kc[:, b, start + n:], k[:, b, start + n:])
        assert torch.equal(kc[:, b, :start], k[:, b, :start])


def test_compaction_overlapping_source_and_destination(triton_backend):
    # Path [0, 2, 3]: j = 1 reads slot start + 2, which j = 2 then overwrites with slot start + 3.
    parents = torch.tensor([-1, 0, 0, 2])
    candidates = torch.tensor([[0, 5, 6, 7]])
    verifier = torch.tensor([[6, 0, 7, 9]])
    accepted_nodes, accept_len, _ = tree_accept(candidates, verifier, parents)
    assert accepted_nodes.tolist() == [[0, 2, 3]]
    slot_ids = torch.arange(10.0).view(1, 1, 10, 1, 1).expand(2, 1, 10, 2, 4).contiguous()
    k, v = slot_ids.clone(), -slot_ids.clone()
    cache_seqlens = torch.tensor([4], dtype=torch.int32)
    compact_kv_cache(k, v, cache_seqlens, accepted_nodes, accept_len)
    assert k[0, 0, :, 0, 0].tolist() == [0, 1, 2, 3, 4, 6, 7, 7, 8, 9]
    assert torch.equal(v, -k)
    assert cache_seqlens.tolist() == [7]


def test_compaction_skips_finished_rows_and_takes_a_short_cache_seqlens(triton_backend):
    gen = torch.Generator().manual_seed(9)
    k = torch.randn(2, 4, 12, 2, 4, generator=gen)
    v = torch.randn(2, 4, 12, 2, 4, generator=gen)
    accepted_nodes = torch.tensor([[0, 2, 5], [0, 1, -1], [0, 3, 4]])
    accept_len = torch.tensor([3, 2, 0])                        # row 2 finished: masked out by the caller
    cache_seqlens = torch.tensor([1, 4, 2], dtype=torch.int32)   # (B,) instead of (B_max,)
    (kc, vc, sl), (kr, vr, slr) = _run_both(k, v, cache_seqlens, accepted_nodes, accept_len)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    assert sl.tolist() == slr.tolist() == [4, 6, 2]
    assert torch.equal(kc[:, 2:], k[:, 2:]) and torch.equal(vc[:, 2:], v[:, 2:])
    assert torch.equal(kc[:, 0, 2], k[:, 0, 3]) and torch.equal(kc[:, 0, 3], k[:, 0, 6])


def test_compaction_strided_index_tensors(triton_backend):
    """accepted_nodes, accept_len and cache_seqlens as strided views: each element read at its stride."""
    gen = torch.Generator().manual_seed(11)
    k = torch.randn(2, 3, 12, 2, 4, generator=gen)
    v = torch.randn(2, 3, 12, 2, 4, generator=gen)
    accepted_nodes = torch.tensor([[0, 2, 5], [0, 1, -1], [0, 3, 4]])
    accept_len = torch.tensor([3, 2, 3])
    seqlens = torch.tensor([1, 4, 2], dtype=torch.int32)
    strided_nodes = accepted_nodes.T.contiguous().T                   # strides (1, 3)
    strided_len = torch.stack([accept_len, accept_len], dim=1)[:, 0]   # stride 2
    wide_seqlens = torch.zeros(3, 2, dtype=torch.int32)
    wide_seqlens[:, 0] = seqlens
    kc, vc = k.clone(), v.clone()
    compact_kv_cache(kc, vc, wide_seqlens[:, 0], strided_nodes, strided_len)
    kr, vr, slr = k.clone(), v.clone(), seqlens.clone()
    reference.compact_kv_cache(kr, vr, slr, accepted_nodes, accept_len)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    assert wide_seqlens[:, 0].tolist() == slr.tolist() == [4, 6, 5] and not wide_seqlens[:, 1].any()


def test_compaction_strided_cache(triton_backend):
    # (Hkv, Dh) stored transposed: the kernel follows the strides instead of assuming a layout.
    gen = torch.Generator().manual_seed(10)
    k = torch.randn(2, 3, 9, 5, 3, generator=gen).transpose(3, 4)      # (L, B, S, Hkv=3, Dh=5), strided
    v = torch.randn(2, 3, 9, 5, 3, generator=gen).transpose(3, 4)
    accepted_nodes = torch.tensor([[0, 1, 4], [0, 2, -1]])
    accept_len = torch.tensor([3, 2])
    cache_seqlens = torch.tensor([2, 5, 0], dtype=torch.int32)
    (kc, vc, _), (kr, vr, _) = _run_both(k, v, cache_seqlens, accepted_nodes, accept_len)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    assert torch.equal(kc, _expected_compaction(k, cache_seqlens, accepted_nodes, accept_len))


def _compaction_args():
    k = torch.zeros(2, 3, 8, 2, 4)
    return dict(k_cache=k, v_cache=k.clone(), cache_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32),
                accepted_nodes=torch.tensor([[0, 1], [0, -1]]), accept_len=torch.tensor([2, 1]))


@pytest.mark.parametrize("change,match", [
    (dict(k_cache=torch.zeros(3, 8, 2, 4)), r"must both be \(L, B_max, S, Hkv, Dh\)"),
    (dict(v_cache=torch.zeros(2, 3, 8, 2, 5)), r"must both be \(L, B_max, S, Hkv, Dh\)"),
    (dict(v_cache=torch.zeros(2, 3, 8, 2, 4, dtype=torch.float16)), "k_cache dtype torch.float32 != v_cache dtype"),
    (dict(accepted_nodes=torch.zeros(4, 2, dtype=torch.int64)), "B <= B_max = 3"),
    (dict(accepted_nodes=torch.tensor([[0, 1], [0, -1]], dtype=torch.int32)), "accepted_nodes must be int64"),
    (dict(accept_len=torch.tensor([2, 1, 1])), r"accept_len must be \(2,\)"),
    (dict(cache_seqlens=torch.tensor([1, 2, 3])), "cache_seqlens must be int32"),
    (dict(cache_seqlens=torch.tensor([1], dtype=torch.int32)), r"shape \(3,\) or \(2,\)"),
    (dict(accept_len=torch.tensor([3, 1])), r"accept_len\[0\] = 3 is outside \[0, 2\]"),
    (dict(accepted_nodes=torch.tensor([[0, 0], [0, -1]])), r"accepted_nodes\[0, 1\] = 0 < 1"),
    (dict(cache_seqlens=torch.tensor([7, 2, 3], dtype=torch.int32)), "past the cache end"),
    (dict(accept_len=torch.tensor([2, 1]).to("meta")), "must be on one device"),
])
def test_compaction_rejects_bad_input(change, match):
    args = {**_compaction_args(), **change}
    before = args["cache_seqlens"].clone() if args["cache_seqlens"].device.type == "cpu" else None
    with pytest.raises(ValueError, match=match):
        compact_kv_cache(**args)
    if before is not None:
        assert torch.equal(args["cache_seqlens"], before)      # nothing advanced on failure


# --------------------------------------------------------------------------------------------
# GPU (compiled kernels, bf16 caches): run by benchmarks/gpu_check.sh
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("T,B", [(16, 1), (64, 32), (256, 8)])
def test_gpu_tree_accept_matches_reference(T, B):
    gen = torch.Generator().manual_seed(T + B)
    parents = _random_parents(T, gen)
    candidates, verifier, _ = _planted_acceptance(parents, B, gen)
    expected = reference.tree_accept(candidates, verifier, parents)
    out = tree_accept(candidates.cuda(), verifier.cuda(), parents.cuda())
    _assert_same([t.cpu() for t in out], expected)
    out = tree_accept_tokens(candidates.cuda(), verifier.cuda(), parents.cuda())
    _assert_same([t.cpu() for t in out], reference.tree_accept_tokens(candidates, verifier, parents))


@pytest.mark.gpu
def test_gpu_compaction_7b_shape_and_graph_capture():
    gen = torch.Generator().manual_seed(0)
    T, B, L, S, Hkv, Dh = 64, 8, 32, 512, 8, 128
    parents = _random_parents(T, gen)
    candidates, verifier, _ = _planted_acceptance(parents, B, gen)
    cache_seqlens = torch.randint(0, S - T + 1, (B,), generator=gen, dtype=torch.int32)
    k = torch.randn(L, B, S, Hkv, Dh, generator=gen).bfloat16()
    v = torch.randn(L, B, S, Hkv, Dh, generator=gen).bfloat16()
    accepted_nodes, accept_len, _ = reference.tree_accept(candidates, verifier, parents)
    k_ref, v_ref, sl_ref = k.clone(), v.clone(), cache_seqlens.clone()
    reference.compact_kv_cache(k_ref, v_ref, sl_ref, accepted_nodes, accept_len)

    kc, vc, slc = k.cuda(), v.cuda(), cache_seqlens.cuda()
    cand_c, ver_c, parents_c = candidates.cuda(), verifier.cuda(), parents.cuda()
    tree_accept(cand_c, ver_c, parents_c)          # compile, and check the tree once, outside the capture
    compact_kv_cache(kc.clone(), vc.clone(), slc.clone(), *tree_accept(cand_c, ver_c, parents_c)[:2])
    torch.cuda.synchronize()
    # Accept + compact without any host read: capturable in a CUDA graph.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nodes_c, len_c, _ = tree_accept(cand_c, ver_c, parents_c)
        compact_kv_cache(kc, vc, slc, nodes_c, len_c)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(kc.cpu(), k_ref) and torch.equal(vc.cpu(), v_ref) and torch.equal(slc.cpu(), sl_ref)

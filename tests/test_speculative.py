"""Self-speculative decoding: token trees, the tree builder, greedy exactness, sampling distribution.

Greedy tests use `drafting_model`: a tiny random model made to have partly right drafts. Its
embedding and unembedding are one-hot, so each head block's feed-forward is a lookup table
token -> predicted token: head 0 follows a fixed 32-cycle `succ`, head i predicts succ^(i+1)
(right for about `agreement` of the tokens, random otherwise). The attention and trunk blocks keep
random weights, so context (and so the KV cache) still changes some greedy tokens: dropping KV
compaction changes the output (test_output_depends_on_kv_compaction).
"""
import copy
import json

import random
import warnings

import pytest
import torch

from mtp_engine import ModelArgs, Transformer
from mtp_engine import speculative as spec
from mtp_engine.generate import Generator
from mtp_engine.speculative import (TokenTree, build_tree, chain_paths, expected_accept_length,
                                    measure_acceptance_rates, preset_paths, resolve_tree, validate_paths)

VOCAB = 32


def drafting_model(heads=4, agreement=0.7, context=1.0, seed=0, vocab=VOCAB, attention_heads=4):
    """See the module docstring. Returns (model, succ) with succ (V,) the cycle head 0 follows."""
    torch.manual_seed(seed)
    args = ModelArgs(dim=vocab, n_layers=2 + heads, n_heads=attention_heads, n_kv_heads=attention_heads // 2,
                     vocab_size=vocab, multiple_of=16,
                     n_future_tokens=heads, max_seq_len=64, max_batch_size=4)
    model = Transformer(args).eval()
    g = torch.Generator().manual_seed(seed)
    cycle = torch.randperm(vocab, generator=g)
    succ = torch.empty(vocab, dtype=torch.long)
    succ[cycle] = cycle.roll(-1)
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(torch.eye(vocab))
        model.output.weight.copy_(6.0 * torch.eye(vocab))
        for block in model.blocks():
            block.attention.wo.weight.mul_(context)
            block.feed_forward.w2.weight.mul_(context)
        for i, head in enumerate(model.heads):
            target = torch.arange(vocab)
            for _ in range(i + 1):
                target = succ[target]
            if i > 0:
                wrong = torch.rand(vocab, generator=g) > agreement
                target = torch.where(wrong, torch.randint(0, vocab, (vocab,), generator=g), target)
            ff = head.feed_forward
            for w in (ff.w1, ff.w2, ff.w3):
                w.weight.zero_()
            ff.w1.weight[:vocab] = 2.0 * torch.eye(vocab)
            ff.w3.weight[:vocab] = 2.0 * torch.eye(vocab)
            ff.w2.weight[target, torch.arange(vocab)] = 1.0
    return model, succ


@pytest.fixture(scope="module")
def model4():
    return drafting_model(heads=4)[0]


PROMPTS = [[1, 2, 3], [5, 9, 11, 4, 7, 8, 2], list(range(12))]


def plain_and_speculative(model, prompts, max_seq_len=64, **kwargs):
    gen = Generator(model, max_batch_size=len(prompts), max_seq_len=max_seq_len)
    return gen.generate(prompts, **kwargs), gen.generate(prompts, speculative="tree", **kwargs), gen


# ------------------------------------------------------------------------------ trees
def test_presets_are_valid_and_sized():
    for heads, nodes in spec.PRESET_NODES.items():
        paths = preset_paths(heads)
        assert len(paths) == nodes
        assert validate_paths(paths, heads) == [tuple(p) for p in paths]  # already in node order
        assert max(len(p) for p in paths) <= heads - 1
        assert all(tuple(p[:d]) in {tuple(q) for q in paths} for p in paths for d in range(1, len(p)))
    lengths = [expected_accept_length(preset_paths(h), spec.prior_rates(h)) for h in (2, 3, 4)]
    assert lengths == sorted(lengths) and lengths[0] > 1.5
    for name in spec.preset_names():
        heads = 2 if name == "chain" else int(name[5:])
        assert validate_paths(resolve_tree(name, heads), heads)
    assert resolve_tree("chain", 4) == chain_paths(4) == [[0], [0, 0], [0, 0, 0]]
    assert spec.default_tree_name(3) == "heads3"
    assert len(resolve_tree("heads3", 4)) == 23  # a preset for fewer heads fits


@pytest.mark.parametrize("paths, heads, match", [
    ([], 3, "no paths"),
    ("[[0]]", 3, "list of paths"),
    ([[0], []], 3, "non-empty"),
    ([[0], [0, -1]], 3, "negative"),
    ([[0], [0.5]], 3, "non-integer"),
    ([[True], [False]], 3, "bools are not ranks"),
    ([[0], [0, 0], [0, 0, 0]], 3, "depth 3"),
    ([[0], [0]], 3, "twice"),
    ([[0], [1, 0]], 3, r"prefix \[1\]"),
    ([[0]], 0, "heads"),
])
def test_bad_trees_raise(paths, heads, match):
    with pytest.raises(ValueError, match=match):
        validate_paths(paths, heads)


def test_resolve_tree_errors():
    with pytest.raises(ValueError, match="unknown tree preset 'big'"):
        resolve_tree("big", 3)
    with pytest.raises(ValueError, match="depth 3"):
        resolve_tree("heads4", 3)  # a preset for more heads than used
    with pytest.raises(ValueError, match="no tree preset"):
        spec.default_tree_name(12)


def test_token_tree_buffers():
    tree = TokenTree.from_paths([[1, 0], [0], [1], [0, 0], [0, 2]], heads=3)
    # node order: root, [0], [1], [0, 0], [0, 2], [1, 0]
    assert tree.paths == ((0,), (1,), (0, 0), (0, 2), (1, 0))
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 2]
    assert tree.top_k == 3 and tree.size == 6 and tree.max_depth == 2
    # (depth - 1) * top_k + rank
    assert tree.draft_index.tolist()[1:] == [0, 1, 3, 5, 3]
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 0, 1, 0, 0, 0],
                         [1, 1, 0, 1, 0, 0],
                         [1, 1, 0, 0, 1, 0],
                         [1, 0, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(tree.tree_mask, want)


def test_build_candidates_places_each_heads_rank():
    tree = TokenTree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0]], heads=3)
    drafts = torch.tensor([[[10, 11], [20, 21]], [[30, 31], [40, 41]]])  # (B=2, heads-1=2, top_k=2)
    cand = spec.build_candidates(torch.tensor([7, 8]), drafts, tree)
    assert cand.tolist() == [[7, 10, 11, 20, 21, 20], [8, 30, 31, 40, 41, 40]]


def test_accept_step_lines_up_emitted_tokens():
    tree = TokenTree.from_paths([[0], [1], [0, 0], [1, 0]], heads=3)   # nodes: root, [0], [1], [0,0], [1,0]
    cand = torch.tensor([[5, 1, 2, 3, 4],
                         [5, 1, 2, 3, 4],
                         [5, 1, 2, 3, 4]])
    verifier = torch.tensor([[2, 9, 4, 9, 8],     # root -> [1] (token 2) -> [1,0] (token 4), bonus 8
                             [7, 9, 9, 9, 9],     # nothing accepted, bonus 7
                             [1, 3, 9, 6, 9]])    # root -> [0] -> [0,0], bonus 6
    out = spec.accept_step(cand, verifier, tree)
    assert out.accept_len.tolist() == [3, 1, 3]
    assert out.emitted.tolist() == [[2, 4, 8], [7, -1, -1], [1, 3, 6]]
    assert out.next_root.tolist() == [8, 7, 6]
    assert out.last_node.tolist() == [4, 0, 3]


@pytest.mark.parametrize("B,top_k", [(1, 1), (1, 4), (3, 10), (30, 2)])   # 90 rows: two row tiles on a GPU
def test_draft_tokens_are_each_heads_top_k(B, top_k):
    """Each head's top_k tokens, best first, against float64 logits (random: no near-ties)."""
    g = torch.Generator().manual_seed(B * 10 + top_k)
    hidden, weight = torch.randn(B, 3, 24, generator=g), torch.randn(101, 24, generator=g)
    drafts = spec.draft_tokens(hidden, weight, top_k)
    want = torch.topk(hidden.double() @ weight.double().T, top_k, dim=-1).indices
    assert drafts.shape == (B, 3, top_k) and drafts.dtype == torch.int64
    assert torch.equal(drafts, want)


@pytest.mark.parametrize("use_kernel", [False, True])
@pytest.mark.parametrize("B,T,heads,top_k", [(1, 5, 4, 3), (3, 7, 2, 1), (2, 4, 3, 17)])
def test_one_read_verify_and_drafts_equal_the_two_read_ones(request, use_kernel, B, T, heads, top_k):
    """verify_and_score + drafts_from_scores (one read of the unembedding for every head at every
    node) give verify_tokens' greedy tokens and draft_tokens' drafts at each row's last node.
    Integer-valued inputs: exact logits, ties included, so the tie rules must agree too."""
    if use_kernel:
        request.getfixturevalue("triton_backend")
    g = torch.Generator().manual_seed(B * 100 + T * 10 + heads)
    hidden = torch.randint(-2, 3, (B, T, heads, 24), generator=g).float()
    weight = torch.randint(-1, 2, (101, 24), generator=g).float()
    verifier, scored = spec.verify_and_score(hidden, weight, top_k)
    assert torch.equal(verifier, spec.verify_tokens(hidden[:, :, 0], weight))
    last_node = torch.randint(0, T, (B,), generator=g)
    drafts = spec.drafts_from_scores(scored, last_node, T, heads, top_k)
    want = spec.draft_tokens(hidden[torch.arange(B), last_node, 1:], weight, top_k)
    assert drafts.shape == (B, heads - 1, top_k) and torch.equal(drafts, want)


# ------------------------------------------------------------------------------ tree builder
def test_build_tree_is_valid_and_greedy_optimal():
    rates = [[0.6, 0.2, 0.1], [0.5, 0.3, 0.05]]
    for budget in range(1, 13):
        paths = build_tree(rates, budget)
        assert len(paths) == budget and validate_paths(paths, 3)
    # exhaustive check for budget 4: the greedy tree reaches the best expected length
    universe = [(a,) for a in range(3)] + [(a, b) for a in range(3) for b in range(3)]
    from itertools import combinations
    best = max(expected_accept_length([list(p) for p in subset], rates)
               for subset in combinations(universe, 4)
               if all(len(p) == 1 or p[:1] in subset for p in subset))
    assert expected_accept_length(build_tree(rates, 4), rates) == pytest.approx(best)
    assert len(build_tree(rates, 100)) == 12  # every possible node


def test_build_tree_chain_when_top1_dominates_and_monotone():
    rates = [[0.9, 0.05, 0.02], [0.85, 0.05, 0.02], [0.8, 0.04, 0.01]]
    assert build_tree(rates, 3) == chain_paths(4)
    lengths = [expected_accept_length(build_tree(rates, n), rates) for n in range(1, 20)]
    assert all(b >= a for a, b in zip(lengths, lengths[1:])) and lengths[-1] > lengths[0]
    with pytest.raises(ValueError, match="budget"):
        build_tree(rates, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_tree([[1.5]], 2)


def test_measure_acceptance_rates_on_drafting_model():
    exact, _ = drafting_model(heads=3, agreement=1.0, context=0.3, seed=2)
    rates = measure_acceptance_rates(exact, [[1, 2, 3], [4, 5]], top_k=3, max_gen_len=12)
    assert len(rates) == 2 and all(len(r) == 3 for r in rates)
    assert rates[0][0] == pytest.approx(1.0) and rates[1][0] == pytest.approx(1.0)
    partial, _ = drafting_model(heads=3, agreement=0.5, seed=3)
    rates = measure_acceptance_rates(partial, [[1, 2, 3], [4, 5]], top_k=3, max_gen_len=12)
    assert all(0.0 <= x <= 1.0 for row in rates for x in row) and all(sum(row) <= 1.0 + 1e-9 for row in rates)
    assert 0.0 < rates[0][0] < 1.0
    with pytest.raises(ValueError, match="heads"):
        measure_acceptance_rates(partial, [[1]], heads=4)


def test_default_tree_size_follows_the_batch():
    # At most tree_tokens tree tokens per forward over all rows, capped by the preset, never below a chain.
    assert [spec.default_tree_nodes(4, rows, 256) for rows in (1, 8, 32, 64)] == [47, 31, 7, 3]
    for heads in (2, 3, 4, 6):
        for rows in (1, 2, 5, 8, 13, 32, 64, 300):
            for tokens in (16, 100, 256):
                n = spec.default_tree_nodes(heads, rows, tokens)
                assert heads - 1 <= n <= spec.preset_nodes(heads)
                assert rows * (n + 1) <= tokens or n == heads - 1
    paths = spec.default_tree(4, 8, 256)
    assert paths == build_tree(spec.prior_rates(4), 31) and validate_paths(paths, 4)
    # measured rates: those of a model with more heads fit fewer heads (first depths)
    rates = [[0.2, 0.7], [0.6, 0.3], [0.5, 0.1]]
    assert spec.default_tree(3, 1, 256, rates) == build_tree(rates[:2], 23) == [[0], [1], [0, 0], [0, 1],
                                                                                    [1, 0], [1, 1]]
    with pytest.raises(ValueError, match="rates cover 1 drafting depths, but 3 heads need 2"):
        spec.default_tree(3, 1, 256, rates[:1])
    # A vocabulary of 2 tokens: at most ranks 0 and 1 per head, so 2 + 4 = 6 nodes for 3 heads.
    assert spec.default_tree(3, 1, 256, vocab_size=2) == [[0], [1], [0, 0], [0, 1], [1, 0], [1, 1]]
    with pytest.raises(ValueError, match="vocab_size must be an int >= 1"):
        spec.default_tree(3, 1, 256, vocab_size=0)
    with pytest.raises(ValueError, match=r"assumed acceptance rates for up to 8 heads, not 9: pass heads<=8"):
        spec.default_tree(9, 1, 256)
    assert validate_paths(spec.default_tree(9, 1, 256, rates=[[0.5]] * 8), 9)   # measured rates: any count
    for bad in ([["0.9", 0.5]], [[0.9, True]]):
        with pytest.raises(ValueError, match="rates for depth 1 must be numbers"):
            spec.check_rates(bad)
    with pytest.raises(ValueError, match="rows must be an int >= 1"):
        spec.default_tree_nodes(3, 0, 256)
    with pytest.raises(ValueError, match="tree_tokens must be an int >= 1"):
        spec.default_tree_nodes(3, 1, 0.5)


def test_generator_default_tree_is_sized_to_the_batch_and_built_from_its_rates(model4):
    gen = Generator(model4, max_batch_size=3, max_seq_len=64, tree_tokens=48)
    one = gen.generate(PROMPTS[:1], max_gen_len=12, speculative="tree")
    three = gen.generate(PROMPTS, max_gen_len=12, speculative="tree")
    assert one.stats["tree_nodes"] == 48      # the 4-head preset's 47 nodes + root: 48 tokens
    assert three.stats["tree_nodes"] == 12    # 3 rows in a bucket of 4: 4 x 12 = 48 tree tokens per forward
    trees = [gen._check_speculative("tree", 4, None, rows=rows) for rows in (3, 4, 5)]
    assert trees[0].paths == trees[1].paths and trees[2].size == 6    # 5 rows: a bucket of 8, 8 x 6 = 48
    assert three.tokens == gen.generate(PROMPTS, max_gen_len=12).tokens
    assert one.tokens[0] == three.tokens[0]
    # CPU default without tree_tokens: DEFAULT_TREE_TOKENS["cpu"]
    cpu = Generator(model4, max_batch_size=3, max_seq_len=64)._check_speculative("tree", 4, None, rows=1)
    assert cpu.size == 1 + spec.default_tree_nodes(4, 1, spec.DEFAULT_TREE_TOKENS["cpu"])
    # measured rates that favour rank 1 at depth 1 put [1] first among the drafts
    rates = [[0.1, 0.8, 0.05], [0.9, 0.05], [0.9, 0.05]]
    tuned = Generator(model4, max_batch_size=3, max_seq_len=64, tree_tokens=4, tree_rates=rates)
    tree = tuned._check_speculative("tree", 4, None, rows=1)
    assert tree.paths == ((1,), (1, 0), (1, 0, 0))
    out = tuned.generate(PROMPTS, max_gen_len=12, speculative="tree")
    assert out.tokens == three.tokens and out.stats["tree_nodes"] == 4
    # rates that favour width: the 3-node tree stops at depth 2, so head 3 is not run at all
    with pytest.warns(UserWarning, match="drafts with 3 heads"):
        wide = Generator(model4, max_batch_size=3, max_seq_len=64, tree_tokens=4,
                         tree_rates=[[0.5, 0.4], [0.3], [0.3]])._check_speculative("tree", 4, None, rows=1)
    assert wide.max_depth == 2 and wide.heads == 3
    # A vocabulary smaller than the default tree's ranks: the tree keeps to the ranks that exist.
    torch.manual_seed(0)
    tiny = Transformer(ModelArgs(dim=16, n_layers=3, n_heads=2, vocab_size=2, multiple_of=16, n_future_tokens=2,
                                 max_seq_len=32, max_batch_size=1)).eval()
    tiny_gen = Generator(tiny, max_batch_size=1, max_seq_len=16, tree_tokens=256)
    assert tiny_gen._check_speculative("tree", 2, None, rows=1).paths == ((0,), (1,))
    assert (tiny_gen.generate([[0, 1]], max_gen_len=5, speculative="tree").tokens
            == tiny_gen.generate([[0, 1]], max_gen_len=5).tokens)
    for kwargs, match in (({"tree_tokens": 0}, "tree_tokens"), ({"tree_tokens": True}, "tree_tokens"),
                          ({"tree_rates": [[1.5]]}, "rates for depth 1 must lie in")):
        with pytest.raises(ValueError, match=match):
            Generator(model4, max_batch_size=1, max_seq_len=16, **kwargs)


def test_tree_rates_read_from_a_checkpoint(tmp_path):
    from mtp_engine.checkpoint import default_checkpoint
    from mtp_engine.llama import Llama, read_tree_rates

    ckpt = default_checkpoint()
    rates = read_tree_rates(ckpt)
    assert rates == json.loads((ckpt / "tree.json").read_text())["rates"] and len(rates) == 3
    llama = Llama.build(ckpt, ckpt / "tokenizer.model", max_seq_len=32, max_batch_size=1, device="cpu")
    assert llama.generator.tree_rates == rates
    assert read_tree_rates(tmp_path) is None
    (tmp_path / "tree.json").write_text('{"paths": [[0]]}')
    with pytest.raises(ValueError, match=r"tree.json: not a tree file"):
        read_tree_rates(tmp_path)
    (tmp_path / "tree.json").write_text('{"rates": [[0.5, 0.2], [0.4]]}')
    assert read_tree_rates(tmp_path, heads=3) == [[0.5, 0.2], [0.4]]
    with pytest.raises(ValueError, match=r"tree.json: rates cover 2 drafting depths, but the model's 4 heads need 3"):
        read_tree_rates(tmp_path, heads=4)


def test_tree_built_from_measured_rates_runs_and_beats_chain(model4):
    rates = measure_acceptance_rates(model4, [[7, 8, 9], [2, 30, 4, 5]], top_k=4, max_gen_len=40)
    tuned = build_tree(rates, 8)
    gen = Generator(model4, max_batch_size=3, max_seq_len=64)
    plain = gen.generate(PROMPTS, max_gen_len=30)
    chain = gen.generate(PROMPTS, max_gen_len=30, speculative="chain")
    tree = gen.generate(PROMPTS, max_gen_len=30, speculative="tree", tree=tuned)
    assert tree.tokens == chain.tokens == plain.tokens
    assert tree.stats["tree_nodes"] == 9
    assert tree.stats["tokens_per_forward"] > chain.stats["tokens_per_forward"]


# ------------------------------------------------------------------------------ greedy exactness
@pytest.mark.parametrize("mode, heads, tree", [("chain", 4, None), ("tree", 4, None), ("tree", 4, "heads4"),
                                              ("tree", 3, None), ("chain", 2, None), ("tree", 2, None)])
def test_greedy_speculative_equals_plain(model4, mode, heads, tree):
    gen = Generator(model4, max_batch_size=3, max_seq_len=64)
    plain = gen.generate(PROMPTS, max_gen_len=30)
    fast = gen.generate(PROMPTS, max_gen_len=30, speculative=mode, heads=heads, tree=tree)
    assert fast.tokens == plain.tokens
    assert fast.finish_reasons == plain.finish_reasons == ["max_gen_len"] * 3
    assert fast.stats["tokens_per_forward"] > 1.2
    assert fast.stats["forwards"] < plain.stats["forwards"]
    assert len(set(plain.tokens[0])) > 5, "degenerate model: greedy repeats, test too weak"


def test_greedy_with_eos_limits_and_nearly_full_cache(model4):
    # max_seq_len 24: the 12-token prompt has 12 slots left (limit 12 < max_gen_len), fewer than the
    # 48-node tree: the cache keeps room for a whole tree past max_seq_len, so no step shrinks it.
    prompts = [[1, 2, 3], list(range(12)), [5, 9, 11, 4, 7, 8, 2]]
    gen = Generator(model4, max_batch_size=3, max_seq_len=24)
    free = gen.generate(prompts, max_gen_len=16)
    # eos: a token row 0 first produces late and row 1 never does
    eos = next(t for i, t in enumerate(free.tokens[0]) if i >= 4 and t not in free.tokens[0][:i] + free.tokens[1])
    plain = gen.generate(prompts, max_gen_len=16, eos_id=eos)
    assert plain.finish_reasons[0] == "eos" and plain.finish_reasons[1] == "max_seq_len"
    shapes = []
    forward = gen._forward
    gen._forward = lambda tokens, *args, **kw: shapes.append(tokens.shape[1]) or forward(tokens, *args, **kw)
    for mode, tree, size in (("chain", None, 4), ("tree", "heads4", 48)):
        shapes.clear()
        fast = gen.generate(prompts, max_gen_len=16, eos_id=eos, speculative=mode, tree=tree)
        assert fast.tokens == plain.tokens, mode
        assert fast.finish_reasons == plain.finish_reasons
        assert fast.stats["tokens_per_forward"] > 1.0
        assert set(shapes) == {size}, (mode, shapes)   # every verify step runs the whole tree
    assert model4.cache_len == 24 + 48 - 1


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_batch_smaller_than_the_cache_when_the_last_row_ends_first(model4, mode):
    # 3 prompts in a cache of 4 rows; the last row reaches the cache end first, so later steps run
    # fewer rows than the prompt batch (compaction then sees (rows,) lengths, not (3,)).
    prompts = [[5, 9, 11, 4, 7, 8, 2], [1, 2, 3], list(range(12))]
    gen = Generator(model4, max_batch_size=4, max_seq_len=24)
    plain = gen.generate(prompts, max_gen_len=16)
    assert plain.finish_reasons[2] == "max_seq_len" and len(plain.tokens[2]) < len(plain.tokens[0])
    fast = gen.generate(prompts, max_gen_len=16, speculative=mode)
    assert fast.tokens == plain.tokens and fast.finish_reasons == plain.finish_reasons


def test_random_batches_speculative_equals_plain(model4):
    """Random batch shapes against the cache (fewer prompts than rows, ragged lengths, tight caches,
    eos in some rows, 2-4 heads, chain and tree): greedy speculative output equals plain output."""
    rng = random.Random(2026)
    for case in range(40):
        B = rng.randint(1, 4)
        max_batch, max_seq_len = rng.randint(B, 5), rng.randint(14, 40)
        prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))] for _ in range(B)]
        gen = Generator(model4, max_batch_size=max_batch, max_seq_len=max_seq_len)
        max_gen_len = rng.randint(1, 20)
        free = gen.generate(prompts, max_gen_len=max_gen_len)
        eos = rng.choice([None] + [t for row in free.tokens for t in row[1:3]])
        plain = gen.generate(prompts, max_gen_len=max_gen_len, eos_id=eos)
        mode, heads = rng.choice(["chain", "tree"]), rng.randint(2, 4)
        fast = gen.generate(prompts, max_gen_len=max_gen_len, eos_id=eos, speculative=mode, heads=heads)
        context = f"case {case}: B={B} cache={max_batch}x{max_seq_len} lens={[len(p) for p in prompts]} " \
                  f"gen={max_gen_len} eos={eos} {mode} heads={heads}"
        assert fast.tokens == plain.tokens, context
        assert fast.finish_reasons == plain.finish_reasons, context


def test_finished_rows_and_short_limits(model4):
    # row 0 is finished right after prefill (max_gen_len 1 for every row is too short: use the cache),
    # the middle row lives longest, the last row ends before it: masked rows inside the forward.
    prompts = [list(range(15)), [3, 4], list(range(2, 12))]
    gen = Generator(model4, max_batch_size=3, max_seq_len=16)
    plain = gen.generate(prompts, max_gen_len=14)
    assert [len(t) for t in plain.tokens] == [1, 14, 6]
    for mode in ("chain", "tree"):
        assert gen.generate(prompts, max_gen_len=14, speculative=mode).tokens == plain.tokens


def test_output_depends_on_kv_compaction(model4, monkeypatch):
    """Power check: the model reads its cache, so skipping the compaction breaks exactness."""
    import mtp_engine.generate as generate_module

    gen = Generator(model4, max_batch_size=3, max_seq_len=64)
    plain = gen.generate(PROMPTS, max_gen_len=30)

    def advance_only(k_cache, v_cache, cache_seqlens, accepted_nodes, accept_len):
        cache_seqlens[: accepted_nodes.shape[0]] += accept_len.to(cache_seqlens.dtype)

    # A tree whose accepted nodes are not the first slots (rank 1 comes first): compaction must move them.
    tree = [[1], [0], [0, 0], [0, 1], [0, 0, 0]]
    assert gen.generate(PROMPTS, max_gen_len=30, speculative="tree", tree=tree).tokens == plain.tokens
    monkeypatch.setattr(generate_module, "compact_kv_cache", advance_only)
    assert gen.generate(PROMPTS, max_gen_len=30, speculative="tree", tree=tree).tokens != plain.tokens


def test_custom_tree_and_chain_preset_agree(model4):
    gen = Generator(model4, max_batch_size=3, max_seq_len=64)
    plain = gen.generate(PROMPTS, max_gen_len=12).tokens
    chain = gen.generate(PROMPTS, max_gen_len=12, speculative="chain", heads=3)
    as_tree = gen.generate(PROMPTS, max_gen_len=12, speculative="tree", heads=3, tree="chain")
    custom = gen.generate(PROMPTS, max_gen_len=12, speculative="tree", heads=3, tree=[[1], [0], [0, 0], [0, 1]])
    assert chain.tokens == as_tree.tokens == custom.tokens == plain
    assert chain.stats["forwards"] == as_tree.stats["forwards"]
    assert custom.stats["tree_nodes"] == 5 and chain.stats["tree_nodes"] == 3


def test_logprobs_match_plain(model4):
    gen = Generator(model4, max_batch_size=3, max_seq_len=64)
    plain = gen.generate(PROMPTS, max_gen_len=10, logprobs=True)
    fast = gen.generate(PROMPTS, max_gen_len=10, logprobs=True, speculative="tree")
    assert fast.tokens == plain.tokens
    for a, b in zip(fast.logprobs, plain.logprobs):
        assert a == pytest.approx(b, abs=1e-4)
    for a, b in zip(fast.prompt_logprobs, plain.prompt_logprobs):
        assert a == pytest.approx(b, abs=1e-4)


def test_speculative_stats_consistent(model4):
    gen = Generator(model4, max_batch_size=3, max_seq_len=64)
    res = gen.generate(PROMPTS, max_gen_len=20, speculative="tree", heads=3)
    s = res.stats
    for key in ("batch_size", "prompt_tokens", "generated_tokens", "forwards", "tokens_per_forward", "prefill_time_s",
                "wall_time_s", "tokens_per_s", "speculative", "heads", "tree_nodes", "verify_steps",
                "mean_accepted_drafts", "acceptance_per_depth", "acceptance_per_head"):
        assert key in s, key
    assert s["speculative"] == "tree" and s["heads"] == 3
    # 3 rows in a bucket of 4 with 4 tree tokens: never below a chain (2 drafted nodes and the root)
    assert spec.DEFAULT_TREE_TOKENS["cpu"] == 4 and s["tree_nodes"] == 3
    assert s["generated_tokens"] == 60
    assert len(s["acceptance_per_depth"]) == 2
    assert all(0.0 <= r <= 1.0 for r in s["acceptance_per_depth"])
    assert s["acceptance_per_head"] == {"head_1": s["acceptance_per_depth"][0], "head_2": s["acceptance_per_depth"][1]}
    # every sequence-step emits 1 + accepted drafts, except where max_gen_len cut it short
    assert s["generated_tokens"] <= 3 + s["verify_steps"] * (1 + s["mean_accepted_drafts"])
    assert s["generated_tokens"] > 3 + s["verify_steps"]
    per_seq_forwards = 3 + s["verify_steps"]
    assert s["tokens_per_forward"] == pytest.approx(60 / per_seq_forwards)
    assert s["forwards"] <= per_seq_forwards


@pytest.mark.parametrize("kwargs, match", [
    ({"speculative": "beam"}, "speculative"),
    ({"speculative": "tree", "heads": 1}, r"heads must be an int in \[2, 4\]"),
    ({"speculative": "tree", "heads": 5}, r"heads must be an int in \[2, 4\]"),
    ({"speculative": "chain", "heads": True}, "heads"),
    ({"speculative": "chain", "tree": [[0]]}, "speculative='chain'"),
    ({"speculative": "tree", "heads": 2, "tree": [[0], [0, 0]]}, "depth 2"),
    ({"speculative": "tree", "tree": "huge"}, "unknown tree preset"),
    ({"speculative": "tree", "tree": [[40]]}, "vocabulary has only 32"),
    ({"tree": [[0]]}, "heads and tree"),
])
def test_bad_speculative_args(model4, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Generator(model4, max_batch_size=1, max_seq_len=16).generate([[1]], **kwargs)


def test_heads_asked_for_that_the_default_tree_leaves_out_are_warned_of(model4):
    """A default tree too small to reach every head asked for (3 nodes: these rates put the second on
    width) drafts with the heads it reaches, and says so where heads were asked for."""
    gen = Generator(model4, max_batch_size=1, max_seq_len=16, tree_tokens=1, tree_rates=[[0.3, 0.3]] * 3)
    with pytest.warns(UserWarning, match=r"heads=4: the default tree for 1 row\(s\) \(3 nodes, depth 2\) drafts "
                                         r"with 3 heads"):
        out = gen.generate([[1]], max_gen_len=3, speculative="tree", heads=4)
    assert out.stats["heads"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gen.generate([[1]], max_gen_len=3, speculative="tree").stats["heads"] == 3   # all heads: no warning


def test_single_head_model_and_cuda_graph_flag():
    torch.manual_seed(0)
    one_head = Transformer(ModelArgs(dim=16, n_layers=2, n_heads=2, vocab_size=16, multiple_of=16))
    with pytest.raises(ValueError, match="n_future_tokens=1"):
        Generator(one_head, max_batch_size=1, max_seq_len=8).generate([[1]], speculative="chain")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graphs=True needs a model on CUDA"):
            Generator(one_head, max_batch_size=1, max_seq_len=8, cuda_graphs=True).generate([[1]], max_gen_len=2)
    with pytest.raises(ValueError, match="cuda_graphs"):
        Generator(one_head, cuda_graphs="yes")


def test_triton_interpreter_path(triton_backend, monkeypatch):
    """All kernels on the Triton path under the interpreter (fp32), attention included: the drafting
    model's speculative tokens equal its plain ones there, and a random model whose tokens hang on
    attention, rotary, norms and SwiGLU (the drafting model's come mostly from its embeddings, so a
    broken attention kernel passed) gives the reference backend's tokens."""
    model, _ = drafting_model(heads=2, seed=4, attention_heads=2)
    prompts = [[1, 2, 3], [6, 7]]
    gen = Generator(model, max_batch_size=2, max_seq_len=16)
    plain = gen.generate(prompts, max_gen_len=6)
    fast = gen.generate(prompts, max_gen_len=6, speculative="tree", tree=[[0], [1]])
    assert fast.tokens == plain.tokens
    one_read = Generator(model, max_batch_size=2, max_seq_len=16, shared_unembed=True)   # linear_candidates
    assert one_read.generate(prompts, max_gen_len=6, speculative="tree", tree=[[0], [1]]).tokens == plain.tokens
    torch.manual_seed(4)
    dense = Transformer(ModelArgs(dim=32, n_layers=4, n_heads=2, n_kv_heads=1, vocab_size=32, multiple_of=16,
                                  n_future_tokens=2, max_seq_len=64, max_batch_size=4)).eval()
    with torch.no_grad():
        for weight in (p for p in dense.parameters() if p.dim() == 2):
            weight.normal_(0.0, 0.3)
    on_triton = Generator(dense, max_batch_size=2, max_seq_len=16)
    plain = on_triton.generate(prompts, max_gen_len=6)
    fast = on_triton.generate(prompts, max_gen_len=6, speculative="tree", tree=[[0], [1]])
    monkeypatch.setenv("MTP_BACKEND", "reference")
    want = Generator(dense, max_batch_size=2, max_seq_len=16).generate(prompts, max_gen_len=6)
    assert plain.tokens == fast.tokens == want.tokens


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_one_read_of_the_unembedding_gives_the_same_tokens(model4, mode):
    """shared_unembed=True (every head scored at every node in the verifier's read, drafts ranked
    from those scores) and False (a second read for the drafts) emit the same greedy tokens,
    equal to plain decoding's; sampling ignores the switch (same draws for the same seed)."""
    prompts = [[5, 9, 11, 4, 7, 8, 2], [1, 2, 3], list(range(12))]
    plain = Generator(model4, max_batch_size=3, max_seq_len=60).generate(prompts, max_gen_len=14)
    runs = {flag: Generator(model4, max_batch_size=3, max_seq_len=60, shared_unembed=flag) for flag in (True, False)}
    greedy = {flag: gen.generate(prompts, max_gen_len=14, speculative=mode) for flag, gen in runs.items()}
    assert greedy[True].tokens == greedy[False].tokens == plain.tokens
    assert greedy[True].stats["tokens_per_forward"] == greedy[False].stats["tokens_per_forward"] > 1.0
    sampled = {flag: gen.generate(prompts, max_gen_len=8, speculative=mode, temperature=0.9, seed=4).tokens
               for flag, gen in runs.items()}
    assert sampled[True] == sampled[False]


# ------------------------------------------------------------------------------ sampling
SAMPLE_VOCAB = 8


@pytest.fixture(scope="module")
def sampling_model():
    return make_sampling_model()


def make_sampling_model():
    """Random 3-head model on 8 tokens with mildly peaked next-token distributions."""
    torch.manual_seed(5)
    args = ModelArgs(dim=16, n_layers=4, n_heads=2, vocab_size=SAMPLE_VOCAB, multiple_of=16, n_future_tokens=3,
                     max_seq_len=32)
    model = Transformer(args).eval()
    with torch.no_grad():
        model.output.weight.mul_(2.0)
        model.extra_heads[0].load_state_dict(model.layers[-1].state_dict())  # drafts often accepted
    return model


def exact_two_token_probs(model, prompt, temperature, top_p, top_k=0, min_p=0.0):
    """P(t1, t2) under plain sampling: (V, V), from uncached forwards (mtp_engine.sampling's rule: the
    top_k most likely and those at least min_p times as likely as the best, renormalized, then
    their nucleus), in float64."""
    ref = copy.deepcopy(model)
    ref.clear_caches()

    def dist(logits):
        probs = torch.softmax(logits.double() / temperature, dim=-1)
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
        if top_k:
            sorted_p[..., top_k:] = 0.0
        sorted_p = torch.where(sorted_p >= min_p * sorted_p[..., :1], sorted_p, 0.0)
        sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
        keep = (torch.cumsum(sorted_p, -1) - sorted_p) < top_p
        kept = torch.zeros_like(probs).scatter(-1, idx, sorted_p * keep)
        return kept / kept.sum(-1, keepdim=True)

    with torch.no_grad():
        p1 = dist(ref.forward(torch.tensor([prompt]))[0, -1, 0])                         # (V,)
        seqs = torch.tensor([prompt + [t] for t in range(SAMPLE_VOCAB)])
        p2 = dist(ref.forward(seqs)[:, -1, 0])                                           # (V, V)
    return p1[:, None] * p2


def sampled_pairs(model, prompt, rows, calls, seed, **kwargs):
    gen = Generator(model, max_batch_size=rows, max_seq_len=16)
    counts = torch.zeros(SAMPLE_VOCAB, SAMPLE_VOCAB)
    for call in range(calls):
        res = gen.generate([prompt] * rows, max_gen_len=2, seed=seed + call, eos_id=-1, **kwargs)
        for toks in res.tokens:
            counts[toks[0], toks[1]] += 1
    return counts, res.stats


def chi_square_pvalue(counts, probs):
    n = counts.sum()
    expected = (probs.float() * n).flatten()
    observed = counts.flatten()
    big = expected >= 5  # pool the rare cells into one
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()
    statistic = ((obs - exp) ** 2 / exp).sum().double()
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


@pytest.mark.parametrize("temperature, top_p, top_k, min_p", [(1.0, 1.0, 0, 0.0), (0.8, 0.85, 0, 0.0),
                                                              (1.0, 1.0, 4, 0.0), (1.2, 0.9, 5, 0.0),
                                                              (1.2, 1.0, 0, 0.1), (1.2, 0.9, 5, 0.05)])
def test_speculative_sampling_keeps_the_models_distribution(sampling_model, temperature, top_p, top_k, min_p):
    prompt = [1, 5, 2]
    probs = exact_two_token_probs(sampling_model, prompt, temperature, top_p, top_k, min_p)
    counts, stats = sampled_pairs(sampling_model, prompt, rows=500, calls=8, seed=100, temperature=temperature,
                                  top_p=top_p, top_k=top_k, min_p=min_p, speculative="tree", heads=2, tree="heads2")
    assert stats["acceptance_per_depth"][0] > 0.3  # the tree really accepted sampled drafts
    assert chi_square_pvalue(counts, probs) > 1e-3
    # power: the same counts reject a slightly different temperature's distribution
    wrong = exact_two_token_probs(sampling_model, prompt, temperature * 1.25, top_p, top_k, min_p)
    assert chi_square_pvalue(counts, wrong) < 1e-6
    if top_p < 1 or top_k or min_p:
        assert counts[probs == 0].sum() == 0  # nothing outside the nucleus or the cuts
    if top_k or min_p:   # and the cut is a real one: without it the draws would reach more pairs
        assert (exact_two_token_probs(sampling_model, prompt, temperature, top_p) > 1e-3).sum() > (probs > 0).sum()


def test_plain_sampling_passes_the_same_test(sampling_model):
    prompt = [1, 5, 2]
    counts, _ = sampled_pairs(sampling_model, prompt, rows=500, calls=8, seed=200, temperature=1.0)
    assert chi_square_pvalue(counts, exact_two_token_probs(sampling_model, prompt, 1.0, 1.0)) > 1e-3


def test_speculative_sampling_reproducible_with_seed(model4):
    gen = Generator(model4, max_batch_size=3, max_seq_len=64)
    a = gen.generate(PROMPTS, max_gen_len=12, temperature=1.0, seed=7, speculative="tree").tokens
    b = gen.generate(PROMPTS, max_gen_len=12, temperature=1.0, seed=7, speculative="tree").tokens
    # the drafting model is nearly deterministic: some other seed, not every one, draws otherwise
    others = [gen.generate(PROMPTS, max_gen_len=12, temperature=1.0, seed=seed, speculative="tree").tokens
              for seed in range(8, 12)]
    assert a == b and any(a != c for c in others)


@pytest.mark.parametrize("mode", ["chain", "tree"])
@pytest.mark.parametrize("temperature, top_p, top_k, min_p", [(1.0, 1.0, 0, 0.0), (0.8, 0.9, 0, 0.0),
                                                              (0.8, 1.0, [2, 0, 3], 0.0), (1.5, 1.0, 0, [0.1, 0.0, 0.3])])
def test_sampled_speculative_equals_plain_with_the_same_seeds(sampling_model, mode, temperature, top_p, top_k, min_p):
    """Every node draws the token at its position with the noise plain decoding draws that position
    with, so seeded speculative sampling emits plain sampling's tokens, several per forward."""
    prompts = [[1, 5, 2], [3], [4, 4, 6, 1, 0, 7]]
    gen = Generator(sampling_model, max_batch_size=3, max_seq_len=32)
    kwargs = dict(max_gen_len=20, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, eos_id=-1)
    plain = gen.generate(prompts, seed=[3, 1, 4], **kwargs)
    fast = gen.generate(prompts, seed=[3, 1, 4], speculative=mode, heads=3, **kwargs)
    assert fast.tokens == plain.tokens
    assert fast.stats["tokens_per_forward"] > 1.1
    assert plain.tokens != gen.generate(prompts, max_gen_len=20, eos_id=-1).tokens   # real draws
    assert gen.generate(prompts, seed=[3, 1, 5], speculative=mode, heads=3, **kwargs).tokens[2] != plain.tokens[2]


def test_random_batches_sampled_speculative_equals_plain(sampling_model):
    """Random batches (ragged prompts, eos, tight caches, 2-3 heads, chain and tree, nucleus, top-k cut or not):
    seeded speculative sampling equals seeded plain sampling token for token."""
    rng = random.Random(2027)
    for case in range(16):
        B = rng.randint(1, 4)
        max_batch, max_seq_len = rng.randint(B, 5), rng.randint(12, 32)
        prompts = [[rng.randrange(SAMPLE_VOCAB) for _ in range(rng.randint(1, 8))] for _ in range(B)]
        gen = Generator(sampling_model, max_batch_size=max_batch, max_seq_len=max_seq_len)
        kwargs = dict(max_gen_len=rng.randint(1, 16), temperature=rng.choice([0.5, 1.0, 1.7]),
                      top_p=rng.choice([1.0, 0.8]), top_k=rng.choice([0, 0, 2, 5]), seed=rng.randrange(2 ** 63),
                      eos_id=rng.choice([-1, 3]), min_p=rng.choice([0.0, 0.0, 0.1]))
        plain = gen.generate(prompts, **kwargs)
        mode, heads = rng.choice(["chain", "tree"]), rng.randint(2, 3)
        fast = gen.generate(prompts, speculative=mode, heads=heads, **kwargs)
        context = f"case {case}: lens={[len(p) for p in prompts]} cache={max_batch}x{max_seq_len} {kwargs} {mode} {heads}"
        assert fast.tokens == plain.tokens, context
        assert fast.finish_reasons == plain.finish_reasons, context


def test_sampled_speculative_equals_plain_on_the_triton_path(triton_backend, sampling_model):
    prompts = [[1, 5, 2], [6]]
    gen = Generator(sampling_model, max_batch_size=2, max_seq_len=16)
    kwargs = dict(max_gen_len=6, temperature=1.0, top_p=1.0, seed=[11, 12], eos_id=-1)
    plain = gen.generate(prompts, **kwargs).tokens
    assert gen.generate(prompts, speculative="tree", heads=3, **kwargs).tokens == plain
    assert gen.generate(prompts, speculative="chain", heads=3, **{**kwargs, "top_p": 0.9}).tokens == \
        gen.generate(prompts, **{**kwargs, "top_p": 0.9}).tokens
    assert gen.generate(prompts, speculative="tree", heads=3, **{**kwargs, "top_k": [3, 0]}).tokens == \
        gen.generate(prompts, **{**kwargs, "top_k": [3, 0]}).tokens
    assert gen.generate(prompts, speculative="tree", heads=3, **{**kwargs, "min_p": [0.2, 0.0]}).tokens == \
        gen.generate(prompts, **{**kwargs, "min_p": [0.2, 0.0]}).tokens


def test_a_sampled_batch_of_one_equals_plain_on_the_triton_path(triton_backend, sampling_model):
    """A batch of one repeats its temperature for each tree node as a stride-0 view; the kernel once
    read it as contiguous, past its one element, and sampled the nodes after the first with
    whatever temperature lay there (this seed, from a fuzz, then left plain decoding's tokens)."""
    gen = Generator(sampling_model, max_batch_size=1, max_seq_len=20)
    kwargs = dict(max_gen_len=16, temperature=0.7, seed=[1076286614705], eos_id=-1)
    plain = gen.generate([[17 % SAMPLE_VOCAB]], **kwargs)
    for mode in ("tree", "chain"):
        fast = gen.generate([[17 % SAMPLE_VOCAB]], speculative=mode, heads=3, **kwargs)
        assert fast.tokens == plain.tokens, mode
        assert fast.stats["tokens_per_forward"] > 1.1


# ------------------------------------------------------------------------------ CLI
def test_cli_complete_speculative_prints_stats(tmp_path, capsys):
    from mtp_engine.checkpoint import save_checkpoint
    from mtp_engine.cli import main
    from mtp_engine.demo import stdlib_sources
    from mtp_engine.tokenizer import train_tokenizer

    tok = train_tokenizer(stdlib_sources(2), 512, tmp_path / "tokenizer")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=4, n_heads=2, vocab_size=tok.n_words, multiple_of=16,
                                  n_future_tokens=3))
    save_checkpoint(model, tmp_path / "ckpt")
    base = ["complete", "--ckpt-dir", str(tmp_path / "ckpt"), "--tokenizer-path", str(tmp_path / "tokenizer.model"),
            "--prompt", "import os", "--prompt", "def f(x):", "--max-gen-len", "8", "--max-seq-len", "40",
            "--device", "cpu"]
    assert main(base) == 0
    plain = capsys.readouterr().out.splitlines()
    assert main(base + ["--speculative", "tree", "--heads", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:-1] == plain[:-1]  # greedy: same text
    # 2 rows and 4 cpu tree tokens: a chain's 2 drafted nodes and the root
    assert "tokens/forward" in out[-1] and "tree, 3 heads, 2 drafted nodes, acceptance by depth" in out[-1]
    assert main(base + ["--speculative", "tree", "--heads", "2", "--tree", json.dumps([[0], [1], [2]])]) == 0
    assert "tree, 2 heads, 3 drafted nodes" in capsys.readouterr().out
    for extra, match in ((["--heads", "2"], "need --speculative"),
                         (["--speculative", "tree", "--tree", "[[0], [0"], "not a valid JSON"),
                         (["--speculative", "chain", "--heads", "7"], "heads must be")):
        assert main(base + extra) == 2
        assert match in capsys.readouterr().err


def emulate_cuda_graphs(monkeypatch) -> None:
    """CUDAGraphSteps on the CPU: a capture runs the step once from the loaded inputs and keeps its
    outputs (`_ReplayByRerun`), a replay re-runs it into them, and every variant times alike (a tie
    keeps the first listed)."""
    from mtp_engine.generate import CUDAGraphSteps

    def record(self, run, load, device):
        load()
        graph = _ReplayByRerun(run, tuple(out.clone() for out in run()))
        return graph, graph.outputs

    def replay_ms(graph, load):
        load()
        graph.replay()
        return 1.0

    monkeypatch.setattr(CUDAGraphSteps, "_record", record)
    monkeypatch.setattr(CUDAGraphSteps, "_replay_ms", staticmethod(replay_ms))


class _ReplayByRerun:
    """Stands in for a CUDA graph on the CPU: replay re-runs the captured step and writes its
    results into the outputs captured first, as a graph replay rewrites its output buffers."""

    def __init__(self, run, outputs):
        self.run, self.outputs, self.replays = run, outputs, 0

    def replay(self):
        self.replays += 1
        for buffer, value in zip(self.outputs, self.run()):
            buffer.copy_(value)


@pytest.mark.parametrize("mode", [None, "chain", "tree"])
def test_graph_bookkeeping_matches_eager_on_cpu(model4, monkeypatch, mode):
    """The CUDA-graph path's bookkeeping (static inputs, power-of-two batch buckets with padding rows,
    one graph per shape, reuse across calls, re-capture after setup_caches) emulated on the CPU: the
    tokens equal the eager run's. Capture itself (allocations, syncs) is left to the GPU test below."""
    from mtp_engine.generate import CUDAGraphSteps

    recorded = []

    def record(self, run, load, device):
        for _ in range(2):  # warm-up runs as on the GPU: each from the loaded inputs
            load()
            outputs = run()
        graph = _ReplayByRerun(run, tuple(out.clone() for out in outputs))
        graph.concurrent, graph.one_read = self.model.concurrent_heads, graphed._one_read
        recorded.append(graph)
        return graph, graph.outputs

    def replay_ms(graph, load):   # a verify step captured four ways: here in order, one read is fastest
        load()
        graph.replay()
        return (2.0 if graph.concurrent else 1.0) + (0.0 if graph.one_read else 0.5)

    monkeypatch.setattr(CUDAGraphSteps, "_record", record)
    monkeypatch.setattr(CUDAGraphSteps, "_replay_ms", staticmethod(replay_ms))
    # The Generator's rows go shortest prompt first: row 0 ([1, 2, 3]) stops at an eos (then sits
    # inside the forward), row 2 (12 prompt tokens) reaches the cache end and leaves the forward, so
    # the batch drops from bucket 4 (3 rows + a padding row) to bucket 2.
    prompts = [[5, 9, 11, 4, 7, 8, 2], [1, 2, 3], list(range(12))]
    max_seq_len = 24 if mode is None else 80
    eager = Generator(model4, max_batch_size=4, max_seq_len=max_seq_len, cuda_graphs=False)
    free = eager.generate(prompts, max_gen_len=16)
    eos = next(t for i, t in enumerate(free.tokens[1])
               if i >= 4 and t not in free.tokens[1][:i] + free.tokens[0] + free.tokens[2])
    want = eager.generate(prompts, max_gen_len=16, eos_id=eos, speculative=mode)
    graphed = Generator(model4, max_batch_size=4, max_seq_len=max_seq_len, cuda_graphs=False)
    monkeypatch.setattr(graphed, "_use_cuda_graphs", lambda: True)
    got = graphed.generate(prompts, max_gen_len=16, eos_id=eos, speculative=mode)
    assert got.tokens == want.tokens and got.finish_reasons == want.finish_reasons
    captured = len(recorded)
    buckets = {key[0] for key in graphed._graphs._graphs}
    steps = {key[2] for key in graphed._graphs._graphs}
    if mode is None:
        assert got.finish_reasons == ["max_gen_len", "eos", "max_seq_len"] and buckets == {4, 2}
        assert steps == {"plain"}   # greedy: forward and argmax as one graph, as a verify step
    else:
        assert got.finish_reasons[1] == "eos" and 4 in buckets
        assert steps == {"verify"}   # greedy: the whole verify step is one graph
        # each verify graph was captured with the heads concurrent and in order, reading the
        # unembedding once and twice, and the fastest kept; its tokens are the eager ones (above)
        choices = graphed._graphs.variant_choices()
        timed = {"concurrent, one read": 2.0, "concurrent, two reads": 2.5, "in order, one read": 1.0,
                 "in order, two reads": 1.5}
        assert choices and all(c[1:] == (timed, "in order, one read") for c in choices)
        assert all(e.variant == "in order, one read" for e in graphed._graphs._graphs.values())
        assert graphed.model.concurrent_heads and not graphed._one_read   # the switches restored
    assert sum(g.replays for g in recorded) > captured
    again = graphed.generate(prompts, max_gen_len=16, eos_id=eos, speculative=mode)
    assert again.tokens == want.tokens and len(recorded) == captured       # same shapes: replays only
    # Sampled, a greedy row among them, a nucleus per row: the padding row (zeros) draws harmlessly.
    sampled = dict(temperature=[2.0, 0.0, 1.5], top_p=[0.9, 1.0, 0.8], seed=[1, 2, 3], eos_id=eos)
    want_sampled = eager.generate(prompts, max_gen_len=16, speculative=mode, **sampled)
    assert graphed.generate(prompts, max_gen_len=16, speculative=mode, **sampled).tokens == want_sampled.tokens
    captured = len(recorded)
    old_caches = (graphed.model.k_cache, graphed.model.v_cache)   # held: the new ones get other addresses
    graphed.model.setup_caches(4, graphed.model.cache_len)                    # new cache tensors
    assert graphed.generate(prompts, max_gen_len=16, eos_id=eos, speculative=mode).tokens == want.tokens
    assert len(recorded) > captured                                           # graphs were re-captured
    del old_caches
    captured = len(recorded)
    graphed.model._grow_rope(graphed.model.freqs_cis.shape[0] * 2)            # a new rotary table
    assert graphed.generate(prompts, max_gen_len=16, eos_id=eos, speculative=mode).tokens == want.tokens
    assert len(recorded) > captured                                           # re-captured again
    captured = len(recorded)
    wo = graphed.model.layers[0].attention.wo                                 # a replaced block weight
    wo.weight = torch.nn.Parameter(wo.weight.detach().clone(), requires_grad=wo.weight.requires_grad)
    assert graphed.generate(prompts, max_gen_len=16, eos_id=eos, speculative=mode).tokens == want.tokens
    assert len(recorded) > captured                                           # its graphs read the old one
    graphs = graphed._graphs
    graphs.MAX_GRAPHS = len(graphs._graphs) - 1            # more graphs kept than allowed: the next call
    graphs.start_call()                                    # starts afresh
    assert not graphs._graphs


def test_verify_step_variants(model4):
    """Which captures a verify step compares: heads in order / concurrent (several heads, concurrency
    on; in order first, the plainest, which CUDAGraphSteps checks the others against) times one / two
    reads of the unembedding (a whole greedy step with shared_unembed None, up to ONE_READ_MAX_ROWS
    scored rows); each variant's context sets the switches and restores them."""
    from mtp_engine.speculative import ONE_READ_MAX_ROWS

    gen = Generator(model4, max_batch_size=2, max_seq_len=16)
    both = ["in order, one read", "in order, two reads", "concurrent, one read", "concurrent, two reads"]
    assert list(gen._step_variants(4, scored_rows=ONE_READ_MAX_ROWS)) == both
    assert list(gen._step_variants(4, scored_rows=ONE_READ_MAX_ROWS + 1)) == ["in order, two reads",
                                                                             "concurrent, two reads"]
    assert list(gen._step_variants(4)) == ["in order", "concurrent"]          # a sampled step
    assert list(gen._step_variants(1, scored_rows=8)) == ["concurrent, one read", "concurrent, two reads"]
    with gen._step_variants(4, scored_rows=8)["in order, one read"]():
        assert not gen.model.concurrent_heads and gen._one_read
    assert gen.model.concurrent_heads and not gen._one_read
    gen.shared_unembed, gen.model.concurrent_heads = True, False
    try:
        assert list(gen._step_variants(4, scored_rows=10 ** 6)) == ["in order, one read"]
    finally:
        gen.model.concurrent_heads = True
    with pytest.raises(ValueError, match="shared_unembed must be None, True or False"):
        Generator(model4, max_batch_size=2, max_seq_len=16, shared_unembed=1)


def test_steps_are_also_captured_with_programmatic_launches_where_supported(model4, monkeypatch):
    """On a device with programmatic dependent launch every step's variants come twice, the second
    time with the switch on (kernels/dependent_launch.py), after the ordinary ones (a tie keeps
    those); a plain step gets the two. Elsewhere nothing changes."""
    from mtp_kernels import dependent_launch
    from mtp_kernels.dependent_launch import launch_programmatic

    gen = Generator(model4, max_batch_size=2, max_seq_len=16)
    verify = gen._step_variants(4, scored_rows=10 ** 6)
    assert gen._with_programmatic_launch(verify) is verify and gen._with_programmatic_launch(None) is None
    monkeypatch.setattr(dependent_launch, "programmatic_supported", lambda device: True)
    both = gen._with_programmatic_launch(verify)
    assert list(both) == ["in order, two reads", "concurrent, two reads", "in order, two reads, programmatic launch",
                          "concurrent, two reads, programmatic launch"]
    plain = gen._with_programmatic_launch(None)
    assert list(plain) == ["ordinary launches", "programmatic launch"]
    device = torch.device("cpu")
    for label, setting in (*both.items(), *plain.items()):
        with setting():
            assert launch_programmatic(device) is label.endswith("programmatic launch"), label
            assert gen.model.concurrent_heads is not label.startswith("in order"), label
    assert not launch_programmatic(device) and gen.model.concurrent_heads   # the switches restored


def test_a_variant_whose_capture_fails_is_left_out(model4, monkeypatch):
    """Where one way of a step cannot be captured (a driver without programmatic launches in graphs),
    the others are kept and timed, with a warning; the tokens are the eager ones."""
    from mtp_engine.generate import CUDAGraphSteps
    from mtp_kernels import dependent_launch
    from mtp_kernels.dependent_launch import launch_programmatic

    def record(self, run, load, device):
        if launch_programmatic(device):
            raise RuntimeError("operation not permitted when stream is capturing")
        load()
        graph = _ReplayByRerun(run, tuple(out.clone() for out in run()))
        return graph, graph.outputs

    monkeypatch.setattr(dependent_launch, "programmatic_supported", lambda device: True)
    monkeypatch.setattr(CUDAGraphSteps, "_record", record)
    monkeypatch.setattr(CUDAGraphSteps, "_replay_ms", staticmethod(lambda graph, load: 1.0))
    prompts = [[5, 9, 11, 4, 7, 8, 2], [1, 2, 3]]
    want = Generator(model4, max_batch_size=2, max_seq_len=40, cuda_graphs=False).generate(prompts, max_gen_len=12)
    graphed = Generator(model4, max_batch_size=2, max_seq_len=40, cuda_graphs=False)
    monkeypatch.setattr(graphed, "_use_cuda_graphs", lambda: True)
    with pytest.warns(UserWarning, match=r"variant\(s\) \['programmatic launch'\] failed"):
        got = graphed.generate(prompts, max_gen_len=12)
    assert got.tokens == want.tokens
    assert all(e.variant == "ordinary launches" for e in graphed._graphs._graphs.values())


def test_a_variant_whose_replay_disagrees_is_left_out_however_fast(model4, monkeypatch):
    """A way of launching that computes wrong values on some GPU (a programmatic launch reading too
    early) can time fastest: every variant's replay is checked against the first listed's from the
    same inputs, and one that disagrees is left out with a warning. A Triton error while a variant
    first compiles its kernels is a failed capture, as a driver's RuntimeError is, and where every
    variant fails the Generator goes on eagerly. The tokens are the eager ones throughout."""
    from triton.runtime.errors import OutOfResources

    from mtp_engine.generate import CUDAGraphSteps
    from mtp_kernels import dependent_launch
    from mtp_kernels.dependent_launch import launch_programmatic

    def wrong_record(self, run, load, device):
        load()
        bad = launch_programmatic(device)
        step = (lambda: tuple(out + 1 for out in run())) if bad else run   # its tokens and lengths off by one
        graph = _ReplayByRerun(step, tuple(out.clone() for out in step()))
        graph.programmatic = bad
        return graph, graph.outputs

    monkeypatch.setattr(dependent_launch, "programmatic_supported", lambda device: True)
    monkeypatch.setattr(CUDAGraphSteps, "_record", wrong_record)
    monkeypatch.setattr(CUDAGraphSteps, "_replay_ms",
                        staticmethod(lambda graph, load: 0.5 if graph.programmatic else 1.0))
    prompts = [[5, 9, 11, 4, 7, 8, 2], [1, 2, 3]]
    want = Generator(model4, max_batch_size=2, max_seq_len=40, cuda_graphs=False).generate(prompts, max_gen_len=12)

    def graphed_generator():
        gen = Generator(model4, max_batch_size=2, max_seq_len=40, cuda_graphs=False)
        monkeypatch.setattr(gen, "_use_cuda_graphs", lambda: gen.cuda_graphs is not False)
        gen.cuda_graphs = None
        return gen

    graphed = graphed_generator()
    with pytest.warns(UserWarning, match=r"variant\(s\) \['programmatic launch'\] gave other results than "
                                         r"'ordinary launches'"):
        assert graphed.generate(prompts, max_gen_len=12).tokens == want.tokens
    assert all(e.variant == "ordinary launches" and e.variant_ms is None for e in graphed._graphs._graphs.values())

    def failing_record(self, run, load, device):
        if launch_programmatic(device):
            raise OutOfResources(300000, 232448, "shared memory")
        return wrong_record(self, run, load, device)

    monkeypatch.setattr(CUDAGraphSteps, "_record", failing_record)
    with pytest.warns(UserWarning, match=r"variant\(s\) \['programmatic launch'\] failed, kept the others"):
        assert graphed_generator().generate(prompts, max_gen_len=12).tokens == want.tokens
    monkeypatch.setattr(dependent_launch, "programmatic_supported", lambda device: False)
    monkeypatch.setattr(CUDAGraphSteps, "_record", lambda *a: (_ for _ in ()).throw(OutOfResources(1, 0, "x")))
    gen = graphed_generator()
    with pytest.warns(UserWarning, match="CUDA graph capture failed, generating eagerly"):
        assert gen.generate(prompts, max_gen_len=12).tokens == want.tokens
    assert gen.cuda_graphs is False


@pytest.mark.parametrize("mode", [None, "tree"])
def test_failed_capture_falls_back_to_eager_or_raises_when_asked(model4, monkeypatch, mode):
    """A capture that fails (a whole plain or verify step) leaves the Generator
    eager with a warning and the same tokens; cuda_graphs=True re-raises instead."""
    from mtp_engine.generate import CUDAGraphSteps

    def record(self, run, load, device):
        load()
        run()  # the warm-up ran, then capture failed: state must not leak into the result
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(CUDAGraphSteps, "_record", record)
    prompts = [[5, 9, 11, 4, 7, 8, 2], [1, 2, 3]]
    want = Generator(model4, max_batch_size=2, max_seq_len=40, cuda_graphs=False).generate(
        prompts, max_gen_len=12, speculative=mode)
    gen = Generator(model4, max_batch_size=2, max_seq_len=40, cuda_graphs=False)
    gen.cuda_graphs = None
    monkeypatch.setattr(gen, "_use_cuda_graphs", lambda: gen.cuda_graphs is not False)
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        got = gen.generate(prompts, max_gen_len=12, speculative=mode)
    assert got.tokens == want.tokens and gen.cuda_graphs is False
    gen.cuda_graphs = True
    with pytest.raises(RuntimeError, match="stream is capturing"):
        gen.generate(prompts, max_gen_len=12, speculative=mode)


def test_graphed_sampling_and_logprobs_are_one_graph_per_step(model4, monkeypatch):
    """A sampled step draws noise keyed by device tensors (the prompts' seeds, the tokens' positions),
    so it is one graph per step as a greedy one is, plain and verify, nucleus or not; so is a step
    that computes the emitted tokens' log-probs. Draws and log-probs equal the eager run's."""
    emulate_cuda_graphs(monkeypatch)
    prompts = [[5, 9, 11, 4, 7, 8, 2], [1, 2, 3]]
    eager = Generator(model4, max_batch_size=2, max_seq_len=40, cuda_graphs=False)

    def graphed_generator():
        gen = Generator(model4, max_batch_size=2, max_seq_len=40, cuda_graphs=False)
        monkeypatch.setattr(gen, "_use_cuda_graphs", lambda: True)
        return gen

    sampled, keys = graphed_generator(), set()
    for mode in (None, "tree"):   # (the tree's larger caches drop the plain graphs: keys gathered per call)
        for kwargs in (dict(temperature=2.0, seed=3), dict(temperature=2.0, top_p=0.9, seed=[5, 6]),
                       dict(temperature=2.0, top_k=[4, 0], seed=[5, 6]),
                       dict(temperature=2.0, min_p=[0.1, 0.0], seed=[5, 6])):
            want = eager.generate(prompts, max_gen_len=12, speculative=mode, **kwargs)
            assert want.tokens != eager.generate(prompts, max_gen_len=12, speculative=mode).tokens   # real draws
            for _ in range(2):   # captured, then replayed
                assert sampled.generate(prompts, max_gen_len=12, speculative=mode, **kwargs).tokens == want.tokens
                keys |= {key[2:] for key in sampled._graphs._graphs}
    assert {key[0] for key in keys} == {"plain", "verify"}
    # One graph for any values: the Gumbel-max path and the nucleus path (top_p, top_k, min_p per row),
    # per step kind; the key says which of them are per-row tensors, and the top_k bound.
    # (the last two: penalties, a logit bias)
    assert {key[-7:] for key in keys} == {("sampled", False, False, False, None, False, False),
                                          ("sampled", True, False, False, None, False, False),
                                          ("sampled", False, True, False, 4, False, False),   # 4: the largest top_k, a power of two
                                          ("sampled", False, False, True, None, False, False)}
    captured = len(sampled._graphs._graphs)
    other = dict(temperature=[1.3, 0.0], top_p=[0.7, 0.95], seed=[8, 9])   # a greedy row among them
    want = eager.generate(prompts, max_gen_len=12, speculative="tree", **other)
    assert sampled.generate(prompts, max_gen_len=12, speculative="tree", **other).tokens == want.tokens
    assert len(sampled._graphs._graphs) == captured   # replayed with the new values
    with_logprobs, keys = graphed_generator(), set()
    for mode, kwargs in ((None, {}), ("tree", {}), ("tree", dict(temperature=2.0, seed=3))):
        want = eager.generate(prompts, max_gen_len=12, speculative=mode, logprobs=True, **kwargs)
        for _ in range(2):
            got = with_logprobs.generate(prompts, max_gen_len=12, speculative=mode, logprobs=True, **kwargs)
            assert got.tokens == want.tokens
            assert all(g == pytest.approx(w, abs=1e-5) for g, w in zip(got.logprobs, want.logprobs))
            keys |= {key[2:] for key in with_logprobs._graphs._graphs}
    assert {key[0] for key in keys} == {"plain", "verify"} and all(key[-1] == "logprobs" for key in keys)


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "chain", "tree"])
def test_cuda_graphs_do_not_change_results(mode):
    from mtp_kernels.attention import _kernel_supports

    # 2 attention heads of dim 16 (GQA 2:1) in bf16: the graphs replay the Triton KV-cache kernel.
    model, _ = drafting_model(heads=4, seed=6, attention_heads=2)
    model = model.to("cuda", torch.bfloat16)
    assert _kernel_supports(torch.empty(1, 1, 2, VOCAB // 2, device="cuda", dtype=torch.bfloat16))
    prompts = [[1, 2, 3], [5, 9, 11, 4, 7, 8, 2], list(range(12))]
    eager = Generator(model, max_batch_size=4, max_seq_len=64, cuda_graphs=False)
    want = eager.generate(prompts, max_gen_len=24, speculative=mode)
    graphed = Generator(model, max_batch_size=4, max_seq_len=64, cuda_graphs=True)
    for _ in range(2):  # first call captures, second replays
        got = graphed.generate(prompts, max_gen_len=24, speculative=mode)
        assert got.tokens == want.tokens
    for sampled in (dict(temperature=0.9, top_p=0.95, seed=[1, 2, 3]),   # a whole sampled step per graph too
                    dict(temperature=1.3, top_k=[3, 0, 5], seed=[1, 2, 3]),
                    dict(temperature=[0.0, 1.1, 0.8], repetition_penalty=[1.5, 1.0, 0.7], frequency_penalty=0.4,
                         logit_bias=[{3: 2.0, 5: -100.0}, None, {7: 1.5}], seed=[1, 2, 3])):
        want_sampled = eager.generate(prompts, max_gen_len=24, speculative=mode, **sampled)
        for _ in range(2):
            assert graphed.generate(prompts, max_gen_len=24, speculative=mode, **sampled).tokens == want_sampled.tokens
    for per_row in (("sampled", True, False, False, None, False, False), ("sampled", False, True, False, 8, False, False),
                    ("sampled", False, False, False, None, True, True)):
        assert any(key[2] in ("plain", "verify") and key[-7:] == per_row for key in graphed._graphs._graphs)
    want_lp = eager.generate(prompts, max_gen_len=24, speculative=mode, logprobs=True)   # log-probs in the graph
    got_lp = graphed.generate(prompts, max_gen_len=24, speculative=mode, logprobs=True)
    assert got_lp.tokens == want_lp.tokens
    assert all(g == pytest.approx(w, abs=5e-2) for g, w in zip(got_lp.logprobs, want_lp.logprobs))   # bf16
    if mode is not None:
        plain = eager.generate(prompts, max_gen_len=24)
        assert got.tokens == plain.tokens  # bf16 on GPU too; real-compile Triton kernels
        assert got.stats["tokens_per_forward"] > 1.0
        for shared in (True, False):   # each read of the unembedding forced, graphed and eager
            for graphs in (True, False):
                gen = Generator(model, max_batch_size=4, max_seq_len=64, cuda_graphs=graphs, shared_unembed=shared)
                assert gen.generate(prompts, max_gen_len=24, speculative=mode).tokens == want.tokens, (shared, graphs)

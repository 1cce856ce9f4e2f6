"""Repetition, presence and frequency penalties: the kernels' rule against a float64 loop, the Triton
path against the reference, the generator against uncached decoding, and speculative decoding
(greedy, seeded, and its sampling distribution) against plain decoding with penalties."""
import copy
import random

import pytest
import torch

from mtp_engine.generate import Generator
from mtp_kernels import TokenPenalties, linear_sample, reference
from mtp_kernels.penalties import check_penalties

from test_speculative import (SAMPLE_VOCAB, chi_square_pvalue, drafting_model, emulate_cuda_graphs,
                              exact_two_token_probs, make_sampling_model, sampled_pairs)


def penalized_loop(logits, history, prompt, repetition, presence, frequency, bias=None):
    """One row's rule, token by token in float64: logits (V,), history the generated tokens, bias a
    {token: logit bias} dict (added first)."""
    out = logits.double().clone()
    for v, b in (bias or {}).items():
        out[v] += b
    for v in range(out.shape[0]):
        count = history.count(v)
        if v in prompt or count:
            out[v] = out[v] / repetition if out[v] > 0 else out[v] * repetition
        out[v] -= frequency * count + presence * (count > 0)
    return out


def random_penalties(rng, S, V, R=None, L=3, device="cpu", seen_by_row0=()):
    """TokenPenalties over S sequences (counts, prompts, values drawn), with R rows mapped onto them
    and paths of up to L drafts when R is given; row 0's sequence has the tokens seen_by_row0 in its
    prompt; a random sparse logit bias. Returns (penalties, per-row (history, prompt, r, p, f, bias))."""
    g = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    counts = torch.randint(0, 3, (S, V), generator=g, dtype=torch.int32) * (torch.rand(S, V, generator=g) < 0.3)
    prompt_seen = torch.rand(S, V, generator=g) < 0.2
    values = torch.tensor([[rng.choice([1.0, 0.7, 1.3, 2.0]), rng.choice([0.0, 0.5, -0.4]), rng.choice([0.0, 0.2, 1.5])]
                           for _ in range(S)])
    row_seq = path = None
    if R is not None:
        row_seq = torch.tensor([rng.randrange(S) for _ in range(R)])
        path = torch.tensor([[rng.randrange(V) if rng.random() < 0.6 else -1 for _ in range(L)] for _ in range(R)])
    prompt_seen[0 if row_seq is None else int(row_seq[0]), list(seen_by_row0)] = True
    bias = torch.randn(S, V, generator=g) * 2 * (torch.rand(S, V, generator=g) < 0.2)
    pen = TokenPenalties(counts.to(device), prompt_seen.to(device), *(values[:, i].contiguous().to(device) for i in range(3)),
                         None if row_seq is None else row_seq.to(device), None if path is None else path.to(device),
                         bias.to(device))
    rows = []
    for r in range(S if R is None else R):
        s = r if row_seq is None else int(row_seq[r])
        history = [v for v in range(V) for _ in range(int(counts[s, v]))]
        if path is not None:
            history += [t for t in path[r].tolist() if t >= 0]
        rows.append((history, prompt_seen[s].nonzero()[:, 0].tolist(), *values[s].tolist(),
                     {v: float(bias[s, v]) for v in bias[s].nonzero()[:, 0].tolist()}))
    return pen, rows


# ------------------------------------------------------------------------------ the rule
@pytest.mark.parametrize("R", [None, 7])
def test_penalties_follow_the_rule_in_float64(R):
    rng = random.Random(R or 0)
    S, V = 4, 37
    pen, rows = random_penalties(rng, S, V, R, seen_by_row0=(0, 1, 2))
    logits = torch.randn(S if R is None else R, V) * 3
    logits[0, :3] = torch.tensor([0.0, float("-inf"), 50.0])   # zero, -inf and a large logit stay what the rule says
    got = pen.apply_(logits.clone())
    for r, (history, prompt, rep, pres, freq, bias) in enumerate(rows):
        want = penalized_loop(logits[r], history, prompt, rep, pres, freq, bias)
        torch.testing.assert_close(got[r].double(), want, rtol=1e-6, atol=1e-5, msg=f"row {r}")
    assert got[0, 1] == float("-inf") and got[0, 0] <= 0
    # a chunk of rows reads its own rows' sequences and paths
    torch.testing.assert_close(pen.apply_(logits[2:5].clone(), slice(2, 5)), got[2:5])


def test_neutral_penalties_change_nothing():
    V = 11
    pen = TokenPenalties(torch.randint(0, 4, (3, V), dtype=torch.int32), torch.rand(3, V) < 0.5,
                         torch.ones(3), torch.zeros(3), torch.zeros(3))
    logits = torch.randn(3, V)
    assert torch.equal(pen.apply_(logits.clone()), logits)


# ------------------------------------------------------------------------------ linear_sample
def _problem(R, D, V, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(R, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    return hidden, weight


@pytest.mark.parametrize("R, V, rows_mapped", [(5, 37, False), (9, 1001, True)])
def test_greedy_with_penalties_is_the_penalized_argmax(R, V, rows_mapped):
    rng = random.Random(V)
    hidden, weight = _problem(R, 16, V, seed=R)
    pen, _ = random_penalties(rng, 3 if rows_mapped else R, V, R if rows_mapped else None)
    logits = reference._float32_logits(hidden, weight)
    got = linear_sample(hidden, weight, temperature=0.0, penalties=pen)
    assert torch.equal(got, pen.apply_(logits.clone()).argmax(-1))
    assert not torch.equal(got, logits.argmax(-1))   # the penalties changed some token
    # a greedy row among sampled ones picks the same
    temperature = torch.tensor([0.0] + [1.0] * (R - 1))
    seeds, offsets = torch.arange(R), torch.arange(R) + 5
    mixed = linear_sample(hidden, weight, temperature=temperature, seeds=seeds, offsets=offsets, penalties=pen)
    assert mixed[0] == got[0]


def test_sampled_with_penalties_draws_from_the_penalized_logits():
    """Keyed noise: the draw equals reference.sample_logits on the penalized logits, token for token."""
    rng = random.Random(3)
    R, V = 6, 53
    hidden, weight = _problem(R, 16, V, seed=4)
    pen, _ = random_penalties(rng, 2, V, R)
    seeds, offsets = torch.arange(R) * 7 + 1, torch.arange(R)
    temperature = torch.tensor([0.7, 1.0, 1.3, 0.0, 2.0, 1.0])
    for top_p, top_k, min_p in ((1.0, 0, 0.0), (0.9, 0, 0.0), (1.0, 5, 0.05)):
        got = linear_sample(hidden, weight, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            seeds=seeds, offsets=offsets, penalties=pen)
        want = reference.sample_logits(pen.apply_(reference._float32_logits(hidden, weight)), temperature, top_p,
                                       seeds, offsets, top_k, None, min_p)
        assert torch.equal(got, want), (top_p, top_k, min_p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_path_equals_the_reference_with_penalties(triton_backend, monkeypatch, dtype):
    rng = random.Random(11)
    R, V = 7, 1001
    hidden, weight = _problem(R, 32, V, seed=5, dtype=dtype)
    pen, _ = random_penalties(rng, 3, V, R)
    seeds, offsets = torch.arange(R) + 3, torch.arange(R) * 2
    temperature = torch.tensor([0.0, 0.8, 1.0, 1.5, 0.0, 1.2, 0.9])
    cases = [dict(temperature=0.0), dict(temperature=temperature, seeds=seeds, offsets=offsets),
             dict(temperature=temperature, top_p=0.8, top_k=torch.tensor([0, 4, 0, 9, 2, 0, 1]),
                  seeds=seeds, offsets=offsets)]
    # chunks of 3 rows: each chunk reads its own rows' sequences and paths
    monkeypatch.setattr(reference, "_LOGIT_ELEMENTS_PER_CHUNK", 3 * V)
    on_triton = [linear_sample(hidden, weight, penalties=pen, **kw) for kw in cases]
    monkeypatch.setenv("MTP_BACKEND", "reference")
    on_reference = [linear_sample(hidden, weight, penalties=pen, **kw) for kw in cases]
    for a, b in zip(on_triton, on_reference):
        assert torch.equal(a, b)


@pytest.mark.parametrize("change, match", [
    (dict(counts=torch.zeros(3, 37)), r"penalties.counts must be integer of shape \(3, 37\)"),
    (dict(counts=torch.zeros(3, 36, dtype=torch.int32)), r"penalties.counts must be integer of shape \(3, 37\)"),
    (dict(prompt_seen=torch.zeros(3, 37, dtype=torch.int32)), r"penalties.prompt_seen must be bool"),
    (dict(repetition=torch.ones(2)), r"penalties.repetition must be floating of shape \(3,\)"),
    (dict(repetition=torch.tensor([1.0, 0.0, 1.0])), r"sequence 1: repetition_penalty must be a number > 0"),
    (dict(presence=torch.tensor([0.0, float("nan"), 0.0])), r"sequence 1: presence_penalty must be a number"),
    (dict(frequency=torch.tensor([0.0, 0.0, float("inf")])), r"sequence 2: frequency_penalty must be a number"),
    (dict(row_seq=torch.tensor([0, 1, 3, 0, 0])), r"row_seq must hold sequence indices in \[0, 3\)"),
    (dict(row_seq=torch.tensor([0, 1, 2])), r"penalties.row_seq must be int64 of shape \(5,\)"),
    (dict(row_seq=None), r"penalties hold 3 sequence\(s\) for 5 row\(s\)"),
    (dict(path=torch.tensor([[37]] * 5)), r"penalties.path must hold token ids in \[0, 37\) or -1"),
    (dict(path=torch.zeros(5, dtype=torch.int64)), r"penalties.path must be int64 of shape \(5, L\)"),
    (dict(counts=None), r"penalties.counts missing"),
    (dict(counts=torch.zeros(37, dtype=torch.int32)), r"penalties.counts must be integer of shape \(S, 37\)"),
    (dict(counts=torch.full((3, 37), -1, dtype=torch.int32)), r"penalties.counts must be >= 0"),
    (dict(bias=torch.zeros(3, 37, dtype=torch.int32)), r"penalties.bias must be floating of shape \(3, 37\)"),
    (dict(bias=torch.full((3, 37), float("-inf"))), r"penalties.bias must be finite"),
    (dict(presence=None), r"penalties.presence missing: counts, prompt_seen, repetition, presence and frequency go "
                          r"together \(all None for a bias alone\)"),
    (dict(counts=None, prompt_seen=None, repetition=None, presence=None, frequency=None),
     r"penalties hold neither penalties \(counts, ...\) nor a bias"),
])
def test_bad_penalties_are_named(change, match):
    V = 37
    hidden, weight = _problem(5, 8, V, seed=0)
    fields = dict(counts=torch.zeros(3, V, dtype=torch.int32), prompt_seen=torch.zeros(3, V, dtype=torch.bool),
                  repetition=torch.ones(3), presence=torch.zeros(3), frequency=torch.zeros(3),
                  row_seq=torch.tensor([0, 1, 2, 0, 1]), path=torch.full((5, 2), -1))
    with pytest.raises(ValueError, match=match):
        linear_sample(hidden, weight, temperature=1.0, penalties=TokenPenalties(**{**fields, **change}))
    with pytest.raises(ValueError, match="penalties must be a TokenPenalties or None, got dict"):
        linear_sample(hidden, weight, temperature=1.0, penalties=fields)


def test_bad_logits_and_node_paths_are_named():
    from mtp_engine.sampling import RowSampling
    from mtp_engine.speculative import verify_tokens
    V = 37
    pen = TokenPenalties(torch.zeros(2, V, dtype=torch.int32), torch.zeros(2, V, dtype=torch.bool), torch.ones(2),
                         torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"logits must be float32 \(rows, 37\) \(the counts' or bias' vocabulary\), got "
                                         r"torch.float32 \(2, 36\)"):
        pen.apply_(torch.zeros(2, 36))
    hidden, weight = _problem(2 * 3, 8, V, seed=1)
    hidden, positions = hidden.view(2, 3, 8), torch.arange(3).expand(2, 3)
    penalized = RowSampling(torch.zeros(2, dtype=torch.int64), torch.ones(2), 1.0,
                            penalties=torch.tensor([[1.5, 0.0, 0.0]] * 2)).with_history(V)
    with pytest.raises(ValueError, match=r"node_paths must be int64 of shape \(2, 3, L\) \(tree_paths\), got "
                                         r"torch.int64 \(2, 4, 2\)"):
        verify_tokens(hidden, weight, penalized, positions, node_paths=torch.full((2, 4, 2), -1))
    for sampling in (None, RowSampling(torch.zeros(2, dtype=torch.int64), torch.ones(2), 1.0)):
        with pytest.raises(ValueError, match="node_paths go with penalties"):
            verify_tokens(hidden, weight, sampling, positions, node_paths=torch.full((2, 3, 2), -1))
    with pytest.raises(ValueError, match="penalties over a tree of 3 nodes need node_paths"):
        verify_tokens(hidden, weight, penalized, positions)


def test_tree_paths_hold_each_nodes_drafts_below_the_root():
    from mtp_engine.speculative import TokenTree, tree_paths
    tree = TokenTree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]], heads=4)
    candidates = torch.tensor([[100, 101, 102, 103, 104, 105, 106], [200, 201, 202, 203, 204, 205, 206]])
    paths = tree_paths(candidates, tree)
    assert paths.shape == (2, 7, 3)
    parents = tree.parents.tolist()
    for b in range(2):
        for t in range(7):
            want, node = [], t
            while node > 0:
                want.insert(0, int(candidates[b, node]))
                node = parents[node]
            assert paths[b, t].tolist() == want + [-1] * (3 - len(want))


def test_check_penalties_rule():
    check_penalties(1.2, -2.5, 3.0)
    for args, match in (((0.0, 0, 0), "repetition_penalty must be a number > 0"),
                        ((1e-300, 0, 0), "repetition_penalty"), ((1e39, 0, 0), "repetition_penalty"),
                        ((True, 0, 0), "repetition_penalty"), ((1.0, "0", 0), "presence_penalty"),
                        ((1.0, 0, -1e39), "frequency_penalty")):
        with pytest.raises(ValueError, match=match):
            check_penalties(*args)


# ------------------------------------------------------------------------------ the generator
def naive_penalized(model, prompt, n, repetition=1.0, presence=0.0, frequency=0.0, bias=None):
    """Greedy continuation with penalties and logit bias by full uncached forwards, the rule in float64."""
    ref = copy.deepcopy(model)
    ref.clear_caches()
    seq, generated = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = ref.forward(torch.tensor([seq]))[0, -1, 0]
            token = int(penalized_loop(logits, generated, prompt, repetition, presence, frequency, bias).argmax())
            seq.append(token)
            generated.append(token)
    return generated


@pytest.fixture(scope="module")
def sampling_model():
    return make_sampling_model()


PROMPTS = [[1, 2, 3], [5, 9, 11, 4, 7, 8, 2], list(range(12)), [3] * 5, [7]]
PENALTIES = dict(repetition_penalty=[1.3, 1.0, 2.0, 0.8, 1.1], presence_penalty=[0.0, 0.5, 0.0, 0.2, 1.0],
                 frequency_penalty=[0.1, 0.0, 0.3, 0.0, 0.5])


@pytest.fixture(scope="module")
def model4():
    return drafting_model(heads=4)[0]


def test_greedy_with_penalties_equals_uncached_decoding(model4):
    """Per-prompt penalties, five prompts through two cache rows (continuous batching: a refilled
    row starts its own history)."""
    gen = Generator(model4, max_batch_size=2, max_seq_len=64)
    got = gen.generate(PROMPTS, max_gen_len=20, eos_id=-1, **PENALTIES)
    for i, prompt in enumerate(PROMPTS):
        want = naive_penalized(model4, prompt, 20, *(PENALTIES[k][i] for k in PENALTIES))
        assert got.tokens[i] == want, i
    assert got.tokens != gen.generate(PROMPTS, max_gen_len=20, eos_id=-1).tokens


BIASES = [{20: -100.0, 25: -100.0}, None, {5: 50.0, 6: 2.5, 0: -1.0}, {}, {0: 50.0, 6: -3.0}]


def test_greedy_with_logit_bias_equals_uncached_decoding(model4):
    """Per-prompt logit biases (a dict, None or {} each) with and without penalties, through
    continuous batching: a refilled row takes its own prompt's bias."""
    gen = Generator(model4, max_batch_size=2, max_seq_len=64)
    unbiased = gen.generate(PROMPTS, max_gen_len=16, eos_id=-1)
    for penalties in (PENALTIES, {}):
        got = gen.generate(PROMPTS, max_gen_len=16, eos_id=-1, logit_bias=BIASES, **penalties)
        for i, prompt in enumerate(PROMPTS):
            want = naive_penalized(model4, prompt, 16, *(penalties[k][i] for k in penalties), bias=BIASES[i])
            assert got.tokens[i] == want, (i, penalties)
    assert unbiased.tokens[0][:2] == [20, 25] and not {20, 25} & set(got.tokens[0])   # banned
    assert got.tokens[1] == unbiased.tokens[1] and got.tokens[3] == unbiased.tokens[3]   # None, {}: no bias
    assert got.tokens[2] != unbiased.tokens[2] and got.tokens[4] != unbiased.tokens[4]
    one_for_all = gen.generate(PROMPTS, max_gen_len=16, eos_id=-1, logit_bias={20: -100.0, 25: -100.0})
    assert one_for_all.tokens[0] == gen.generate(PROMPTS[:1], max_gen_len=16, eos_id=-1, logit_bias=BIASES[:1]).tokens[0]


def test_a_logit_bias_alone_keeps_no_counts_and_any_default_dtype(model4):
    """A bias without penalties keeps a (rows, V) float32 bias and no token counts; it works whatever
    torch's default dtype (the bias is float32, as the logits are)."""
    gen = Generator(model4, max_batch_size=2, max_seq_len=64)
    want = gen.generate(PROMPTS, max_gen_len=8, eos_id=-1, logit_bias=BIASES, speculative="tree")
    for i, prompt in enumerate(PROMPTS):
        assert want.tokens[i] == naive_penalized(model4, prompt, 8, bias=BIASES[i])
    from mtp_engine.sampling import RowSampling
    history = RowSampling(torch.zeros(2, dtype=torch.int64), torch.zeros(2), 1.0, biases=[{1: 2.0}, None]).with_history(32)
    assert history.counts is None and history.logit_bias.dtype == torch.float32
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert gen.generate(PROMPTS, max_gen_len=8, eos_id=-1, logit_bias=BIASES, speculative="tree").tokens == want.tokens
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_speculative_with_logit_bias_equals_plain(model4, sampling_model, mode):
    gen = Generator(model4, max_batch_size=3, max_seq_len=64)
    plain = gen.generate(PROMPTS, max_gen_len=20, eos_id=-1, logit_bias=BIASES)
    fast = gen.generate(PROMPTS, max_gen_len=20, eos_id=-1, logit_bias=BIASES, speculative=mode)
    assert fast.tokens == plain.tokens and fast.stats["tokens_per_forward"] > 1.1
    prompts = [[1, 5, 2], [3], [4, 4, 6, 1, 0, 7]]
    gen = Generator(sampling_model, max_batch_size=2, max_seq_len=32)
    kwargs = dict(max_gen_len=16, temperature=[1.0, 0.0, 1.3], seed=[3, 1, 4], eos_id=-1,
                  logit_bias=[{2: 1.5, 7: -2.0}, {1: 2.0}, None], presence_penalty=[0.0, 0.0, 0.5])
    plain = gen.generate(prompts, **kwargs)
    assert gen.generate(prompts, speculative=mode, heads=3, **kwargs).tokens == plain.tokens
    assert plain.tokens != gen.generate(prompts, **{**kwargs, "logit_bias": None}).tokens


@pytest.mark.parametrize("logit_bias, match", [
    ({32: 1.0}, r"logit_bias: token id 32 is not an int in \[0, 32\)"),
    ({-1: 1.0}, r"logit_bias: token id -1 is not an int in \[0, 32\)"),
    ({"5": 1.0}, r"logit_bias: token id '5' is not an int"),
    ({5: float("inf")}, r"logit_bias: the bias of token 5 must be a number within float32's range "
                        r"\(\|bias\| <= 3.403e\+38\), got inf"),
    ({5: 1e39}, r"the bias of token 5 must be a number within float32's range .*, got 1e\+39"),
    ({5: 10 ** 400}, r"got 1000000000000000000000000000000000000\.\.\.$"),
    ({5: "big"}, r"the bias of token 5 must be a number within float32's range"),
    ([{5: 1.0}, {5: float("nan")}], r"^logit_bias\[1\]: the bias of token 5 must be a number"),
    ([(5, 1.0), None], r"^logit_bias\[0\] must be a dict \{token id: bias\} or None, got tuple"),
    ([{5: 1.0}], r"logit_bias: a list needs one value per prompt, got 1 for 2"),
])
def test_bad_logit_bias(model4, logit_bias, match):
    gen = Generator(model4, max_batch_size=2, max_seq_len=32)
    with pytest.raises(ValueError, match=match):
        gen.generate(PROMPTS[:2], max_gen_len=4, logit_bias=logit_bias)


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_greedy_speculative_with_penalties_equals_plain(model4, mode):
    """A tree node is penalized against the accepted tokens and the drafts on its path: accepting
    exactly plain decoding's tokens, several per forward."""
    gen = Generator(model4, max_batch_size=3, max_seq_len=64)
    for kwargs in (PENALTIES, dict(repetition_penalty=1.5), dict(presence_penalty=0.7, frequency_penalty=[0.0, 0.4, 0.0, 1.0, 0.2])):
        plain = gen.generate(PROMPTS, max_gen_len=24, eos_id=-1, **kwargs)
        fast = gen.generate(PROMPTS, max_gen_len=24, eos_id=-1, speculative=mode, **kwargs)
        assert fast.tokens == plain.tokens, kwargs
        assert fast.stats["tokens_per_forward"] > 1.2


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_sampled_speculative_with_penalties_equals_plain_with_the_same_seeds(sampling_model, mode):
    prompts = [[1, 5, 2], [3], [4, 4, 6, 1, 0, 7]]
    gen = Generator(sampling_model, max_batch_size=2, max_seq_len=32)
    kwargs = dict(max_gen_len=16, temperature=[1.0, 0.0, 1.3], top_p=[1.0, 1.0, 0.9], top_k=[0, 0, 5], eos_id=-1,
                  seed=[3, 1, 4], repetition_penalty=[1.5, 1.2, 1.0], presence_penalty=[0.0, 0.3, 0.8],
                  frequency_penalty=[0.4, 0.0, 0.0])
    plain = gen.generate(prompts, **kwargs)
    fast = gen.generate(prompts, speculative=mode, heads=3, **kwargs)
    assert fast.tokens == plain.tokens
    assert fast.stats["tokens_per_forward"] > 1.1
    unpenalized = {k: v for k, v in kwargs.items() if not k.endswith("penalty")}
    assert plain.tokens != gen.generate(prompts, **unpenalized).tokens


def test_sampled_speculative_with_penalties_equals_plain_on_the_triton_path(triton_backend, sampling_model):
    prompts = [[1, 5, 2], [6]]
    gen = Generator(sampling_model, max_batch_size=2, max_seq_len=16)
    kwargs = dict(max_gen_len=6, temperature=[1.0, 0.0], seed=[11, 12], eos_id=-1, repetition_penalty=[1.6, 1.3],
                  frequency_penalty=[0.5, 0.0])
    plain = gen.generate(prompts, **kwargs).tokens
    assert gen.generate(prompts, speculative="tree", heads=3, **kwargs).tokens == plain


def exact_penalized_two_token_probs(model, prompt, temperature, repetition, presence, frequency):
    """P(t1, t2) under plain sampling with penalties, (V, V) in float64 from uncached forwards."""
    ref = copy.deepcopy(model)
    ref.clear_caches()
    V = SAMPLE_VOCAB
    with torch.no_grad():
        first = ref.forward(torch.tensor([prompt]))[0, -1, 0]
        p1 = torch.softmax(penalized_loop(first, [], prompt, repetition, presence, frequency) / temperature, -1)
        second = ref.forward(torch.tensor([prompt + [t] for t in range(V)]))[:, -1, 0]
        p2 = torch.stack([torch.softmax(penalized_loop(second[t], [t], prompt, repetition, presence, frequency)
                                        / temperature, -1) for t in range(V)])
    return p1[:, None] * p2


def test_speculative_sampling_with_penalties_keeps_the_penalized_distribution(sampling_model):
    prompt, penalties = [1, 5, 2], (1.8, 0.6, 0.4)
    probs = exact_penalized_two_token_probs(sampling_model, prompt, 1.0, *penalties)
    kwargs = dict(repetition_penalty=penalties[0], presence_penalty=penalties[1], frequency_penalty=penalties[2])
    counts, stats = sampled_pairs(sampling_model, prompt, rows=500, calls=8, seed=300, temperature=1.0,
                                  speculative="tree", heads=2, tree="heads2", **kwargs)
    assert stats["acceptance_per_depth"][0] > 0.2
    assert chi_square_pvalue(counts, probs) > 1e-3
    # power: the same counts reject the unpenalized distribution and a milder penalty
    assert chi_square_pvalue(counts, exact_two_token_probs(sampling_model, prompt, 1.0, 1.0)) < 1e-6
    assert chi_square_pvalue(counts, exact_penalized_two_token_probs(sampling_model, prompt, 1.0, 1.3, 0.6, 0.4)) < 1e-6


def test_neutral_penalties_keep_the_fast_paths(model4, monkeypatch):
    """1, 0 and 0 (the defaults, also given as lists) keep greedy calls off the logits path."""
    import mtp_kernels.sampling as sampling_kernels
    calls = []
    monkeypatch.setattr(sampling_kernels, "_reference_sample", lambda *a, **k: calls.append(1))
    gen = Generator(model4, max_batch_size=2, max_seq_len=32)
    gen.generate(PROMPTS[:2], max_gen_len=4, repetition_penalty=[1.0, 1.0], presence_penalty=0, frequency_penalty=0.0)
    assert not calls


def test_logprobs_stay_the_models_own(model4):
    gen = Generator(model4, max_batch_size=2, max_seq_len=32)
    penalized = gen.generate(PROMPTS[:2], max_gen_len=6, logprobs=True, repetition_penalty=3.0, frequency_penalty=1.0)
    ref = copy.deepcopy(model4)
    ref.clear_caches()
    with torch.no_grad():
        for prompt, tokens, lps in zip(PROMPTS[:2], penalized.tokens, penalized.logprobs):
            logits = ref.forward(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1, 0]
            want = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(lps, dtype=torch.float64), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(repetition_penalty=0.0), "repetition_penalty must be a number > 0"),
    (dict(repetition_penalty=[1.0, -1.0]), r"repetition_penalty\[1\]: repetition_penalty must be a number > 0"),
    (dict(presence_penalty=float("nan")), "presence_penalty must be a number"),
    (dict(frequency_penalty=[0.0]), "frequency_penalty: a list needs one value per prompt, got 1 for 2"),
    (dict(frequency_penalty=None), "frequency_penalty must be a number"),
])
def test_bad_penalty_arguments(model4, kwargs, match):
    gen = Generator(model4, max_batch_size=2, max_seq_len=32)
    with pytest.raises(ValueError, match=match):
        gen.generate(PROMPTS[:2], max_gen_len=4, **kwargs)


@pytest.mark.parametrize("mode", [None, "tree"])
def test_graphed_steps_with_penalties_equal_eager(model4, monkeypatch, mode):
    """The CUDA-graph path emulated on the CPU: the rows' histories are step inputs (loaded before
    every replay), so graphs captured for the first prompts serve refilled rows with their own
    history and penalties; one graph per step for any penalty values."""
    emulate_cuda_graphs(monkeypatch)
    kwargs = dict(max_gen_len=[6, 12, 4, 9, 7], temperature=[0.0, 1.1, 0.0, 0.8, 1.0], seed=list(range(5)), eos_id=-1,
                  speculative=mode, logit_bias=BIASES, **PENALTIES)
    other = {**kwargs, "repetition_penalty": 1.7, "presence_penalty": [0.0, 0.9, 0.1, 0.0, 0.3],
             "logit_bias": [None, {3: 2.0}, {}, {7: -5.0}, {0: 1.0, 1: 1.0}]}
    # (the eager runs first: a second Generator on the model sets its caches up again, dropping graphs)
    eager = Generator(model4, max_batch_size=2, max_seq_len=48, cuda_graphs=False)
    want, want_other = eager.generate(PROMPTS, **kwargs), eager.generate(PROMPTS, **other)
    assert want.tokens != want_other.tokens
    graphed = Generator(model4, max_batch_size=2, max_seq_len=48, cuda_graphs=False)
    monkeypatch.setattr(graphed, "_use_cuda_graphs", lambda: True)
    assert graphed.generate(PROMPTS, **kwargs).tokens == want.tokens
    captured = len(graphed._graphs._graphs)
    assert all(key[-2:] == (True, True) for key in graphed._graphs._graphs)   # penalties and a logit bias
    assert graphed.generate(PROMPTS, **other).tokens == want_other.tokens
    assert len(graphed._graphs._graphs) == captured   # replayed with the new values
    # 3 rows in a graph of 4: the padding row's zeros are no penalty (repetition 0 would be refused)
    three = {key: value[:3] if isinstance(value, list) else value for key, value in kwargs.items()}
    want = Generator(model4, max_batch_size=4, max_seq_len=48, cuda_graphs=False).generate(PROMPTS[:3], **three)
    padded = Generator(model4, max_batch_size=4, max_seq_len=48, cuda_graphs=False)
    monkeypatch.setattr(padded, "_use_cuda_graphs", lambda: True)
    assert padded.generate(PROMPTS[:3], **three).tokens == want.tokens
    assert 4 in {key[0] for key in padded._graphs._graphs}   # the bucket of 3 rows: one padding row


@pytest.mark.gpu
def test_gpu_bf16_penalties_draw_from_the_penalized_logits():
    """On CUDA in bf16 (the Triton logits kernel, penalties on its chunks): greedy and keyed draws
    equal the reference rule applied to the same float32 logits."""
    from mtp_kernels import linear_logits
    rng = random.Random(21)
    R, V = 12, 32000
    hidden, weight = (t.to("cuda", torch.bfloat16) for t in _problem(R, 256, V, seed=6))
    pen, _ = random_penalties(rng, 4, V, R, L=5, device="cuda")
    seeds, offsets = torch.arange(R, device="cuda") + 9, torch.arange(R, device="cuda") * 3
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3] * 3, device="cuda")
    penalized = pen.apply_(linear_logits(hidden, weight))
    assert torch.equal(linear_sample(hidden, weight, temperature=0.0, penalties=pen), penalized.argmax(-1))
    got = linear_sample(hidden, weight, temperature=temperature, top_k=40, seeds=seeds, offsets=offsets, penalties=pen)
    assert torch.equal(got, reference.sample_logits(penalized, temperature, 1.0, seeds, offsets, 40))

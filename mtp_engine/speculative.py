"""Self-speculative decoding with the model's own extra heads: token trees, the tree builder, and
the tensor logic of one draft/verify step (the loop and the bookkeeping live in `generate.Generator`).

Trees are static and given in Medusa's path format: a list of paths, each a list of top-k ranks,
one per depth. The path (r1, ..., rd) is the node at depth d whose token is head d's rank-rd
candidate, below the node (r1, ..., r(d-1)). Every draft comes from the heads at the last accepted
position: head d (d = 1..k-1) predicts the token d+1 positions after it, i.e. depth d below the
next token (the "bonus" token head 0 picked, which is the tree's root). `chain` is the paper's
blockwise parallel decoding: [[0], [0, 0], [0, 0, 0], ...], top-1 of every head.

Node order everywhere (`TokenTree`): node 0 is the root, then the paths sorted by (depth, ranks),
so parents come before children (parents[t] < t) and siblings are in rank order; `tree_accept`
takes the first matching child, i.e. the best-ranked one.

Acceptance (see `verify_tokens`): the verifier token at node t is head 0's argmax (greedy) or a
draw from head 0's distribution (temperature, top-p) after the path ending at t. The walk descends
into the child whose token equals the verifier token and stops when none does; the verifier token
at the last accepted node is emitted as the bonus. Greedy output therefore equals plain greedy
output, and sampled output has the model's distribution exactly: every emitted token is a draw from
the model's conditional at its own prefix, and the drafts only decide which already computed node
the walk moves into. With keyed noise (`linear_sample`'s seeds and offsets: the sequence's seed,
the position of the token drawn) the draws are plain decoding's own: the node at position p draws
with the noise plain decoding draws position p with, so seeded speculative sampling emits plain
sampling's tokens. (Exact in float32; in bf16 near-ties can break differently from plain
decoding, see Generator.generate.)
"""
from __future__ import annotations

import heapq
import json
import numbers
import operator
import pathlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from mtp_kernels import (TokenCandidates, linear_argmax, linear_candidates, linear_sample, linear_topk, reference,
                         tree_accept_tokens, use_triton)
from mtp_kernels.kv_cache_attention import PackedTreeMask, pack_tree_mask
from mtp_kernels.skinny_linear import skinny_linear

from .sampling import RowSampling

Path = Tuple[int, ...]
TreeSpec = Union[str, Sequence[Sequence[int]]]

SPECULATIVE_MODES = ("chain", "tree")

# Assumed per-depth acceptance of a head's top-1 candidate (given its parent was accepted) and the
# share of the remaining mass each further rank takes: they only shape the presets (deep where
# top-1 is likely, wide where it is not) and were not measured here. For a given model, measure the
# real rates with `measure_acceptance_rates` and build its tree with `build_tree`.
PRIOR_TOP1 = (0.75, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3)
PRIOR_RANK_DECAY = 0.45   # rank r >= 1 takes (1 - top1) * PRIOR_RANK_SHARE * decay^(r-1)
PRIOR_RANK_SHARE = 0.4
PRIOR_TOP_K = 10

# Preset sizes: drafted nodes (the root comes on top) for 2, 3 and 4 heads.
PRESET_NODES = {2: 7, 3: 23, 4: 47}

# Tree tokens per verify forward, all rows together, that the default tree aims for (`default_tree`).
# In bf16 a token costs 2 FLOPs per 2-byte weight, so a forward of M tokens stays bound by reading
# the weights while M is below the matmul rate over the bandwidth: about 260 on the H100 (793
# TFLOP/s, 3.0 TB/s) and 185 on the H200 (benchmarks/results/NOTES.md). Past that, every tree
# token costs compute. On the H100 the 16-node tree beat the 64-node one at batch 8 (estimated at
# prior acceptance rates: 2.5x vs 1.6x over plain) and at batch 32 (1.9x vs 0.7x). Both values
# are provisional: one constant for every CUDA device, and the tree sizes in between are not
# measured. A CPU forward is compute bound from a few tokens (2 cores: past 4 rows a GEMM of a
# dim-1024 model cost more with every row, cpu_decode_cpu.md); on the default model at batch 1,
# 4 tree tokens ran at 1.14x plain tokens/s, 8 at 0.92x, 16 at 0.81x (generate_cpu.md).
DEFAULT_TREE_TOKENS = {"cuda": 256, "cpu": 4}


# ---------------------------------------------------------------------------------- paths
def chain_paths(heads: int) -> List[List[int]]:
    """The paper's blockwise parallel decoding: top-1 of heads 1..heads-1, one node per depth."""
    _check_heads_count(heads)
    return [[0] * depth for depth in range(1, heads)]


def prior_rates(heads: int, top_k: int = PRIOR_TOP_K) -> List[List[float]]:
    """Assumed acceptance rates rates[d-1][r] for depth d = 1..heads-1, rank r < top_k (see PRIOR_*)."""
    _check_heads_count(heads)
    if heads - 1 > len(PRIOR_TOP1):
        raise ValueError(f"no prior acceptance rates for {heads} heads (at most {len(PRIOR_TOP1) + 1})")
    rates = []
    for depth in range(1, heads):
        top1 = PRIOR_TOP1[depth - 1]
        rest = [(1 - top1) * PRIOR_RANK_SHARE * PRIOR_RANK_DECAY ** (r - 1) for r in range(1, top_k)]
        rates.append([top1, *rest])
    return rates


def preset_nodes(heads: int) -> int:
    """Drafted nodes of the preset tree for `heads` heads (its size; the default tree's cap)."""
    return PRESET_NODES.get(heads, 12 * (heads - 1))


def preset_paths(heads: int) -> List[List[int]]:
    """The default tree for `heads` heads (preset "heads<k>"): `build_tree(prior_rates(heads), n)`
    with n = PRESET_NODES[heads] drafted nodes: 2 heads 7 (T = 8 with the root), 3 heads 23 (T = 24),
    4 heads 47 (T = 48); 5..8 heads 12 nodes per drafting head."""
    _check_heads_count(heads)
    if heads == 1:
        raise ValueError("a token tree needs at least 2 heads (head 0 verifies, heads 1.. draft)")
    return build_tree(prior_rates(heads), preset_nodes(heads))


def default_tree_nodes(heads: int, rows: int, tree_tokens: int) -> int:
    """Drafted nodes of the default tree for `rows` sequences: the tree tokens of one verify forward
    (rows x (nodes + 1)) stay within `tree_tokens`, the preset's size caps it, and it never drops
    below heads - 1 nodes (a chain's worth). `build_tree` may spend them on width rather than depth
    where the rates say that pays more, so at small sizes fewer heads may draft (generate warns
    when heads were asked for)."""
    _check_heads_count(heads)
    for name, value in (("rows", rows), ("tree_tokens", tree_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return min(preset_nodes(heads), max(heads - 1, tree_tokens // rows - 1))


def default_tree(heads: int, rows: int, tree_tokens: int, rates=None,
                 vocab_size: Optional[int] = None) -> List[List[int]]:
    """The tree `Generator.generate` verifies when none is given: `build_tree` over `rates` (measured
    per-depth rates, e.g. a checkpoint's tree.json; None = prior_rates) with
    `default_tree_nodes(heads, rows, tree_tokens)` nodes. Rates for more heads than `heads` are cut
    to the first heads - 1 depths, and to `vocab_size` ranks (a head has no more candidates)."""
    nodes = default_tree_nodes(heads, rows, tree_tokens)
    if rates is None:
        if heads - 1 > len(PRIOR_TOP1):
            raise ValueError(f"the default tree has assumed acceptance rates for up to {len(PRIOR_TOP1) + 1} heads, "
                             f"not {heads}: pass heads<={len(PRIOR_TOP1) + 1}, speculative='chain', a tree= of "
                             "paths, or measured rates (`mtp eval --build-tree` writes them beside the checkpoint)")
        rates = prior_rates(heads)
    else:
        rates = check_rates(rates)
        if len(rates) < heads - 1:
            raise ValueError(f"rates cover {len(rates)} drafting depths, but {heads} heads need {heads - 1}")
        rates = rates[:heads - 1]
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        rates = [row[:vocab_size] for row in rates]
    return build_tree(rates, nodes)


def preset_names() -> List[str]:
    """Tree names resolve_tree knows: "chain" and "heads2" .. "heads8" (the preset for that many heads)."""
    return ["chain"] + [f"heads{k}" for k in range(2, len(PRIOR_TOP1) + 2)]


def default_tree_name(heads: int) -> str:
    """The preset name for `heads` heads ("heads<k>")."""
    _check_heads_count(heads)
    name = f"heads{heads}"
    if name not in preset_names():
        raise ValueError(f"no tree preset for {heads} heads; presets exist for 2..{len(PRIOR_TOP1) + 1}")
    return name


def resolve_tree(spec: TreeSpec, heads: int) -> List[List[int]]:
    """Paths (node order) of a tree given by name ("chain", "heads<k>", see preset_names) or as a list
    of paths, checked for `heads` heads (a preset for fewer heads fits; one for more does not)."""
    _check_heads_count(heads)
    if isinstance(spec, str):
        if spec == "chain":
            paths = chain_paths(heads)
        elif spec in preset_names():
            paths = preset_paths(int(spec[len("heads"):]))
        else:
            raise ValueError(f"unknown tree preset {spec!r}; known: {preset_names()} (or give a list of paths)")
    else:
        paths = spec
    return [list(p) for p in validate_paths(paths, heads)]


def tree_argument(spec: str, option: str = "--tree"):
    """A command line's tree, as `resolve_tree` takes it: a preset name as it is, a JSON list of
    paths, or a .json file holding one (or `mtp eval --build-tree`'s {"paths": ...}) read into its
    paths. ValueError / FileNotFoundError naming `option` otherwise."""
    if spec.endswith(".json"):
        path = pathlib.Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{option} {spec}: no such tree file")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{option} {spec}: not valid JSON ({e})") from None
        paths = data.get("paths") if isinstance(data, dict) else data
        if not isinstance(paths, list):
            raise ValueError(f"{option} {spec}: holds no list of paths (a list, or an object with \"paths\")")
        return paths
    if spec.lstrip().startswith("["):
        try:
            return json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"{option} {spec!r}: not a valid JSON list of paths ({e})") from None
    return spec


def validate_paths(paths, heads: int) -> List[Path]:
    """Check a tree in path format for `heads` heads; return its paths as tuples in node order
    (by depth, then ranks). ValueError when a path is empty, not a list of ints >= 0, deeper than
    heads - 1, duplicated, or missing one of its prefixes."""
    _check_heads_count(heads)
    if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
        raise ValueError(f"tree must be a list of paths (lists of top-k ranks), got {type(paths).__name__}")
    if len(paths) == 0:
        raise ValueError("tree has no paths: give at least one, e.g. [[0]]")
    seen = set()
    for i, path in enumerate(paths):
        if isinstance(path, (str, bytes)) or not isinstance(path, Sequence) or len(path) == 0:
            raise ValueError(f"tree path {i} must be a non-empty list of ranks, got {path!r}")
        try:
            if any(isinstance(r, bool) for r in path):
                raise TypeError
            ranks = tuple(operator.index(r) for r in path)
        except TypeError:
            raise ValueError(f"tree path {i} {list(path)!r} contains a non-integer rank (bools are not ranks)") from None
        if any(r < 0 for r in ranks):
            raise ValueError(f"tree path {i} {list(ranks)} has a negative rank")
        if len(ranks) > heads - 1:
            raise ValueError(f"tree path {i} {list(ranks)} has depth {len(ranks)}, but {heads} heads draft "
                             f"at most depth {heads - 1} (head d drafts depth d)")
        if ranks in seen:
            raise ValueError(f"tree path {list(ranks)} appears twice")
        seen.add(ranks)
    for ranks in seen:
        for d in range(1, len(ranks)):
            if ranks[:d] not in seen:
                raise ValueError(f"tree path {list(ranks)} needs its prefix {list(ranks[:d])} in the tree")
    return sorted(seen, key=lambda p: (len(p), p))


def _check_heads_count(heads) -> None:
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be an int >= 1, got {heads!r}")


# ---------------------------------------------------------------------------------- tree builder
def check_rates(rates) -> List[List[float]]:
    """Per-depth, per-rank acceptance rates (rates[d-1][r] in [0, 1]) as lists of floats; ValueError otherwise."""
    if isinstance(rates, torch.Tensor):
        rates = rates.tolist()
    if not isinstance(rates, Sequence) or len(rates) == 0:
        raise ValueError("rates must be a non-empty list (one row per depth) of per-rank acceptance rates")
    rows = []
    for d, row in enumerate(rates, start=1):
        if not isinstance(row, Sequence) or len(row) == 0:
            raise ValueError(f"rates row for depth {d} must be a non-empty list of per-rank rates")
        if any(isinstance(x, bool) or not isinstance(x, numbers.Real) for x in row):
            raise ValueError(f"rates for depth {d} must be numbers, got {list(row)}")
        row = [float(x) for x in row]
        if any(not (0.0 <= x <= 1.0) for x in row):
            raise ValueError(f"rates for depth {d} must lie in [0, 1], got {row}")
        rows.append(row)
    return rows


def path_probability(path: Sequence[int], rates) -> float:
    """Probability that the node `path` is accepted: the product of rates[d-1][path[d-1]] along it."""
    prob = 1.0
    for depth, rank in enumerate(path, start=1):
        row = rates[depth - 1]
        prob *= row[rank] if rank < len(row) else 0.0
    return prob


def expected_accept_length(paths, rates) -> float:
    """Expected tokens per verify step with this tree: 1 (the bonus token) + the sum over nodes of
    the probability that the node is accepted (siblings hold distinct tokens, so at most one child
    of a node is accepted and the node events add up)."""
    rates = check_rates(rates)
    paths = validate_paths(paths, len(rates) + 1)
    return 1.0 + sum(path_probability(p, rates) for p in paths)


def build_tree(rates, budget: int) -> List[List[int]]:
    """The tree of `budget` nodes (root not counted) that maximizes `expected_accept_length`.

    rates[d-1][r]: probability that head d's rank-r candidate is the accepted token given its parent
    was accepted (depth d = 1..len(rates), so the tree serves len(rates) + 1 heads). Greedy, as in
    Medusa and Sequoia: repeatedly add the frontier node (child of a chosen node or of the root) with
    the largest path probability. A node's probability never exceeds its parent's, so the chosen set
    stays prefix-closed and, the objective being a sum over nodes, greedy is optimal. Ties go to the
    shallower, then lexicographically smaller path. Returns paths in node order; fewer than `budget`
    when every possible node (depth <= len(rates), rank < len(row)) is already in.
    """
    rates = check_rates(rates)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1 (drafted nodes), got {budget!r}")
    frontier = [(-path_probability((r,), rates), 1, (r,)) for r in range(len(rates[0]))]
    heapq.heapify(frontier)
    chosen: List[Path] = []
    while frontier and len(chosen) < budget:
        _, depth, path = heapq.heappop(frontier)
        chosen.append(path)
        if depth < len(rates):
            for r in range(len(rates[depth])):
                child = path + (r,)
                heapq.heappush(frontier, (-path_probability(child, rates), depth + 1, child))
    return [list(p) for p in sorted(chosen, key=lambda p: (len(p), p))]


@torch.inference_mode()
def measure_acceptance_rates(model, prompts: Sequence[Sequence[int]], heads: Optional[int] = None,
                             top_k: int = 8, max_gen_len: int = 64) -> List[List[float]]:
    """Per-head top-k acceptance rates for `build_tree`, measured on greedy rollouts of `prompts`.

    Each prompt is continued greedily (plain decoding, `max_gen_len` tokens); one uncached forward
    over prompt + continuation then gives every head's logits at every position. At a position t
    (last prompt token onwards), head d's rank-r candidate is accepted when it equals the greedy
    token at t + 1 + d. rates[d-1][r] = P(rank of that token in head d = r | the tokens of depths
    1..d-1 are within their heads' top_k), i.e. given that the parent can be in a top_k-wide tree.
    Returns a (heads - 1) x top_k list of floats.
    """
    from .generate import Generator

    heads = model.n_future_tokens if heads is None else heads
    _check_heads_count(heads)
    if not 2 <= heads <= model.n_future_tokens:
        raise ValueError(f"heads must be in [2, {model.n_future_tokens}] (the model's heads), got {heads}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= model.vocab_size:
        raise ValueError(f"top_k must be an int in [1, vocab_size = {model.vocab_size}], got {top_k!r}")
    if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int) or max_gen_len < heads:
        raise ValueError(f"max_gen_len must be an int >= heads = {heads} (every depth needs a target), "
                         f"got {max_gen_len!r}")
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("measure_acceptance_rates needs at least one prompt")
    longest = max(len(p) for p in prompts) + max_gen_len + 1
    # the uncached forward's limit, before any rollout
    model.check_uncached_length(longest - 1, f"a prompt of {longest - 1 - max_gen_len} tokens + max_gen_len "
                                             f"{max_gen_len}")
    # The uncached forward needs no cache; a private Generator re-sizes the model's caches and the
    # caller's Generator re-sizes them back on its next call (Generator._ensure_caches).
    rollouts = Generator(model, max_batch_size=1, max_seq_len=longest)
    hits = torch.zeros(heads - 1, top_k, dtype=torch.float64)
    trials = torch.zeros(heads - 1, dtype=torch.float64)
    weight = model.output.weight
    for prompt in prompts:
        continuation = rollouts.generate([prompt], max_gen_len=max_gen_len, eos_id=-1).tokens[0]
        seq = torch.tensor([prompt + continuation], device=weight.device)
        hidden = model.head_hidden(seq, n_heads=heads)[:, 0]              # (heads, L, D)
        L, start = seq.shape[1], len(prompt) - 1
        in_tree = torch.ones(L, dtype=torch.bool, device=weight.device)  # parent reachable at t
        for depth in range(1, heads):
            n = L - 1 - depth - start                                    # positions with a target
            if n <= 0:
                break
            # ranked as the generator drafts (its scores, its tie order); top_k when not among them
            drafts = draft_tokens(hidden[depth, start:start + n, None], weight, top_k)[:, 0]   # (n, top_k)
            target = seq[0, start + 1 + depth:start + 1 + depth + n]
            hit = torch.cat([drafts == target[:, None], torch.ones_like(drafts[:, :1], dtype=torch.bool)], dim=1)
            rank = hit.int().argmax(dim=1)                                              # (n,)
            alive = in_tree[start:start + n]
            trials[depth - 1] += alive.sum().item()
            for r in range(top_k):
                hits[depth - 1, r] += (alive & (rank == r)).sum().item()
            in_tree[start:start + n] = alive & (rank < top_k)
            in_tree[start + n:] = False
    rates = torch.where(trials[:, None] > 0, hits / trials.clamp(min=1)[:, None], torch.zeros_like(hits))
    return rates.tolist()


# ---------------------------------------------------------------------------------- tree buffers
@dataclass(eq=False)
class TokenTree:
    """A validated static tree and the index buffers one verify step needs (T nodes, root = node 0).

    parents (T,) int64 (parents[0] = -1); depths (T,) int64; tree_mask (T, T) bool, node i sees node j
    when j is i or an ancestor; draft_index (T,) int64: node t > 0 takes draft column
    draft_index[t] = (depth - 1) * top_k + rank of the (B, heads - 1, top_k) drafts, flattened.
    Built on the CPU once; `on(device)` copies it once per device.
    """

    paths: Tuple[Path, ...]
    heads: int
    parents: torch.Tensor
    depths: torch.Tensor
    tree_mask: torch.Tensor
    draft_index: torch.Tensor
    top_k: int
    _derived: Dict[tuple, object] = field(default_factory=dict, repr=False)

    @classmethod
    def from_paths(cls, paths, heads: int) -> "TokenTree":
        # Built outside inference mode: the buffers outlive any one generate() call and are plain
        # tensors (tree_accept caches its check of `parents` per tensor, by version counter).
        with torch.inference_mode(False):
            return cls._from_paths(paths, heads)

    @classmethod
    def _from_paths(cls, paths, heads: int) -> "TokenTree":
        ordered = validate_paths(paths, heads)
        node_of = {(): 0}
        for t, path in enumerate(ordered, start=1):
            node_of[path] = t
        T = len(ordered) + 1
        top_k = max(p[-1] for p in ordered) + 1
        parents = torch.full((T,), -1, dtype=torch.int64)
        depths = torch.zeros(T, dtype=torch.int64)
        draft_index = torch.zeros(T, dtype=torch.int64)
        tree_mask = torch.zeros(T, T, dtype=torch.bool)
        tree_mask[0, 0] = True
        for t, path in enumerate(ordered, start=1):
            parent = node_of[path[:-1]]
            parents[t] = parent
            depths[t] = len(path)
            draft_index[t] = (len(path) - 1) * top_k + path[-1]
            tree_mask[t] = tree_mask[parent]
            tree_mask[t, t] = True
        return cls(tuple(ordered), heads, parents, depths, tree_mask, draft_index, top_k)

    @property
    def size(self) -> int:
        """T: nodes including the root."""
        return self.parents.shape[0]

    @property
    def max_depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def device(self) -> torch.device:
        return self.parents.device

    @property
    def packed_mask(self) -> PackedTreeMask:
        """tree_mask packed for the attention kernel, once per tree and device."""
        if "packed" not in self._derived:
            with torch.inference_mode(False):
                self._derived["packed"] = pack_tree_mask(self.tree_mask)
        return self._derived["packed"]

    @property
    def draft_path_nodes(self) -> torch.Tensor:
        """(T, max_depth) int64: the nodes on node t's path below the root, from depth 1 down to t
        itself, -1 after them; once per tree and device (`tree_paths`)."""
        if "draft_path" not in self._derived:
            parents = self.parents.tolist()
            nodes = torch.full((self.size, self.max_depth), -1, dtype=torch.int64)
            for t in range(1, self.size):
                path, node = [], t
                while node > 0:
                    path.append(node)
                    node = parents[node]
                nodes[t, :len(path)] = torch.tensor(path[::-1])
            with torch.inference_mode(False):
                self._derived["draft_path"] = nodes.to(self.device)
        return self._derived["draft_path"]

    def on(self, device) -> "TokenTree":
        device = torch.device(device)
        if device == self.device:
            return self
        key = ("device", str(device))
        if key not in self._derived:
            with torch.inference_mode(False):
                self._derived[key] = TokenTree(self.paths, self.heads, *(
                    t.to(device) for t in (self.parents, self.depths, self.tree_mask, self.draft_index)), self.top_k)
        return self._derived[key]


_TREES: Dict[tuple, TokenTree] = {}


def token_tree(spec: TreeSpec, heads: int) -> TokenTree:
    """The TokenTree of `resolve_tree(spec, heads)`, built once per distinct tree and heads."""
    paths = tuple(tuple(p) for p in resolve_tree(spec, heads))
    key = (paths, heads)
    if key not in _TREES:
        _TREES[key] = TokenTree.from_paths(paths, heads)
    return _TREES[key]


# ---------------------------------------------------------------------------------- step logic
def draft_tokens(hidden: torch.Tensor, weight: torch.Tensor, top_k: int) -> torch.Tensor:
    """hidden: (B, heads - 1, D) normed hidden of heads 1.. at the last accepted position; weight:
    (V, D). Returns (B, heads - 1, top_k) int64: each head's top_k tokens, best first, equal logits
    in id order. On the Triton path `linear_topk` (float32 accumulation, no logits written, no top-k
    over the whole vocabulary). This product reads the whole unembedding a second time in a verify
    step (262 MB at the 7B shape); `verify_and_score` + `drafts_from_scores` read it once instead."""
    B, n_draft, D = hidden.shape
    rows = hidden.reshape(B * n_draft, D)
    if use_triton(rows, weight):
        return linear_topk(rows, weight, top_k).view(B, n_draft, top_k)
    # Elsewhere the logits in the model's dtype: float32 ones of a 16-bit unembedding convert the
    # whole weight at every call (a draft at 3 rows, V 32000, D 1024 in bf16 took 5.8 ms that way
    # against 2.4 on 2 CPU threads, timed by hand); a draft's rank only steers the tree, never the
    # output. A float32 model gets linear_topk's exact ids.
    return reference.top_k_positions(skinny_linear(rows, weight), top_k).view(B, n_draft, top_k)


# Scored rows (batch x tree nodes x heads) up to which a verify step is also captured reading the
# unembedding once (Generator.shared_unembed None). One read saves reading the weight, 2VD bytes,
# and scores heads - 1 more rows per node, 2VD FLOPs each: with the drafts' rows few, it wins while
# the scored rows stay below about 2 x matmul rate / bandwidth, 374 on the H200 and 523 on the H100
# at the measured peaks (benchmarks/results/NOTES.md), which no kernel reaches, so the real break-even
# sits lower. Past 512 rows capturing it would cost time and memory for a variant that loses (its
# partials are rows x V / 128 x top_k x 8 bytes).
ONE_READ_MAX_ROWS = 512


def verify_and_score(hidden: torch.Tensor, weight: torch.Tensor, top_k: int):
    """A greedy verify whose read of the unembedding also drafts: every head at every node is scored
    in one `linear_candidates` launch (B * T * heads rows instead of B * T), so that after acceptance
    the next drafts are a ranking of candidates already computed (`drafts_from_scores`), not a second
    read of the weight. Pays off while the extra rows cost less than reading the weight again: few
    rows (batch 1, small trees), which the Generator finds out by timing both ways at capture.

    hidden: (B, T, heads, D) normed hidden states; weight: (V, D). Returns (verifier (B, T) int64:
    head 0's argmax at every node, equal to `verify_tokens` at temperature 0; the TokenCandidates of
    the B * T * heads rows in (b, t, head) order)."""
    B, T, heads, D = hidden.shape
    scored = linear_candidates(hidden.reshape(B * T * heads, D), weight, top_k)
    head0_rows, _ = _scored_row_ids(B, T, heads, hidden.device)
    return scored.argmax(head0_rows), scored


def drafts_from_scores(scored: TokenCandidates, last_node: torch.Tensor, T: int, heads: int,
                       top_k: int) -> torch.Tensor:
    """The next drafts from `verify_and_score`'s candidates: heads 1.. at each row's last accepted
    node last_node (B,) int64. Returns (B, heads - 1, top_k) int64, equal to `draft_tokens` on those
    hidden states."""
    B = last_node.shape[0]
    _, draft_rows_at_node_0 = _scored_row_ids(B, T, heads, last_node.device)
    rows = draft_rows_at_node_0.add(last_node[:, None], alpha=heads)                       # (B, heads - 1)
    return scored.topk(top_k, rows)


_ROW_IDS: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def _scored_row_ids(B: int, T: int, heads: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row ids into verify_and_score's (b, t, head) rows: head 0's at every node (B, T), and heads
    1.. at node 0 (B, heads - 1), to which a node's offset t * heads is added. Built once per shape
    (the eager warm-up before a capture), so a captured step launches no kernel for them."""
    key = (B, T, heads, str(device))
    if key not in _ROW_IDS:
        node_rows = torch.arange(B * T, device=device).view(B, T) * heads
        _ROW_IDS[key] = node_rows, node_rows[:, :1] + torch.arange(1, heads, device=device)
    return _ROW_IDS[key]


def build_candidates(root: torch.Tensor, drafts: torch.Tensor, tree: TokenTree) -> torch.Tensor:
    """root: (B,) int64 token of node 0; drafts: (B, heads - 1, tree.top_k) from `draft_tokens`.
    Returns candidates (B, T) int64: node t > 0 holds its head's token of its rank."""
    flat = drafts[:, : tree.heads - 1].reshape(drafts.shape[0], -1)
    candidates = flat[:, tree.draft_index]
    candidates[:, 0] = root
    return candidates


def tree_paths(candidates: torch.Tensor, tree: TokenTree) -> torch.Tensor:
    """candidates (B, T) int64 -> (B, T, max_depth) int64: node t's drafts on its path below the root
    (the candidates of its ancestors but the root, and its own), from depth 1 down, -1 after them.
    With penalties, the tokens a node's history holds beyond what its sequence has generated."""
    nodes = tree.draft_path_nodes
    return torch.where(nodes >= 0, candidates[:, nodes.clamp(min=0)], -1)


def verify_tokens(hidden0: torch.Tensor, weight: torch.Tensor, sampling: Optional[RowSampling] = None,
                  positions: Optional[torch.Tensor] = None, node_paths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """hidden0: (B, T, D) head-0 normed hidden at every node. Returns (B, T) int64: head 0's argmax
    (sampling None), or by the B sequences' `RowSampling` one draw per node from softmax(logits /
    temperature) within its top_k and min_p cuts and top-p nucleus (a sequence at temperature 0 picks
    greedily), node (b, t)'s noise keyed by seeds[b] and positions[b, t] (`linear_sample`), positions
    (B, T) int64 or int32 the position of the token the node draws. With the sampling's penalties,
    node (b, t) is penalized against sequence b's history plus the drafts on its path, node_paths
    (B, T, L) (`tree_paths`; None when T = 1 or without penalties); a logit bias is its sequence's."""
    B, T, D = hidden0.shape
    rows = hidden0.reshape(B * T, D)
    if sampling is None:
        if node_paths is not None:
            raise ValueError("verify_tokens: node_paths go with penalties (the drafts a node's history holds)")
        return linear_argmax(rows, weight).view(B, T)
    penalties = sampling.token_penalties()
    counted = penalties is not None and penalties.counts is not None
    if node_paths is not None:
        if not counted:
            raise ValueError("verify_tokens: node_paths go with penalties (the drafts a node's history holds)")
        if not isinstance(node_paths, torch.Tensor) or node_paths.dim() != 3 or node_paths.shape[:2] != (B, T) \
                or node_paths.dtype != torch.int64:
            got = f"{node_paths.dtype} {tuple(node_paths.shape)}" if isinstance(node_paths, torch.Tensor) else type(node_paths).__name__
            raise ValueError(f"verify_tokens: node_paths must be int64 of shape ({B}, {T}, L) (tree_paths), got {got}")
    elif counted and T > 1:
        raise ValueError(f"verify_tokens: penalties over a tree of {T} nodes need node_paths (tree_paths)")
    if penalties is not None and (T > 1 or node_paths is not None):   # nodes against their sequences' (a bias alone: no paths)
        penalties = penalties.for_nodes(B, T, node_paths)

    def per_node(value):   # a per-sequence tensor, repeated for each of its nodes
        return value[:, None].expand(B, T).reshape(B * T) if isinstance(value, torch.Tensor) else value

    tokens = linear_sample(rows, weight, temperature=per_node(sampling.temperature), top_p=per_node(sampling.top_p),
                           top_k=per_node(sampling.top_k), max_top_k=sampling.max_top_k,
                           min_p=per_node(sampling.min_p), penalties=penalties, seeds=per_node(sampling.seeds),
                           offsets=positions.expand(B, T).reshape(B * T).long())
    return tokens.view(B, T)


@dataclass
class StepOutcome:
    """One verify step's result, still on the device.

    accepted_nodes (B, W) int64 node ids (root first, -1 padded); packed (B, 1 + W) int64: accept_len
    (root included), then the accept_len[b] tokens this step produces for sequence b (the accepted
    drafts below the root, then the bonus token), -1 padded; accept_len and emitted are views of its
    first column and the rest; next_root (B,) the bonus; last_node (B,) the last accepted node,
    whose heads draft the next step."""

    accepted_nodes: torch.Tensor
    packed: torch.Tensor
    next_root: torch.Tensor
    last_node: torch.Tensor

    @property
    def accept_len(self) -> torch.Tensor:
        return self.packed[:, 0]

    @property
    def emitted(self) -> torch.Tensor:
        return self.packed[:, 1:]


def accept_step(candidates: torch.Tensor, verifier: torch.Tensor, tree: TokenTree) -> StepOutcome:
    """candidates, verifier: (B, T) int64 on tree's device. Walks the tree and lines up the tokens
    each sequence emits (`tree_accept_tokens`: one launch on the Triton path), without a host sync."""
    return StepOutcome(*tree_accept_tokens(candidates, verifier, tree.parents))

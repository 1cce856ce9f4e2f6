"""Tree verification for speculative decoding: the accepted path of every sequence (one launch for
the batch) and the KV-cache compaction that keeps only the accepted nodes (one launch for all layers).

Tree convention (shared with mtp_engine/speculative.py): a static tree of T nodes in BFS/depth
order. Node 0 is the root = the last produced token (not yet in the KV cache); parents (T,) int64
with parents[0] = -1 and parents[t] < t. The verify forward writes node t's K/V at cache slot
cache_seqlens[b] + t; verifier[b, t] is the model's token after the path ending at node t.

tree_accept: one program per sequence holds its (T,) parents and candidates rows in registers and
walks down from the root, one depth per loop step: the children of the current node are the
positions where parents == current; the first of them (node order) whose candidate equals the
verifier's token at the current node is accepted. T <= a few hundred, so a step is one vector
compare and a min-reduction. tree_accept_tokens: the same walk also writes what each sequence emits
(the accepted drafts and the bonus, packed behind the accepted length) and its last node.

compact_kv_cache: one program per (layer, sequence, block of Hkv*Dh features) moves the K and V of
the accepted nodes from slots start + accepted_nodes[b, j] to the consecutive slots start + j.
Source and destination ranges overlap (path [0, 2, 3]: j = 1 reads slot start+2, j = 2 writes
it), which is safe because each program walks j in increasing order, loading slot j's source
before storing, and a path's node ids satisfy accepted_nodes[b, j] >= j (the node at depth j
has j ancestors, all with smaller ids since parents[t] < t): every load at step j reads a slot
>= start + j, while the stores so far went to slots < start + j. The same thread loads and stores a given feature (same
block layout), so its own program order is all the ordering needed; programs share no memory.
"""
from __future__ import annotations

import weakref

import torch
from .triton_import import tl, triton

from . import reference
from .backend import (check_one_device, eager_under_compile, graph_capturing, interpreting, refuse_shared_caches,
                      use_triton)

_INDEX_DTYPES = (torch.int32, torch.int64)


# ============================================================================================
# Kernels
# ============================================================================================
@triton.jit
def _tree_accept_kernel(
    candidates_ptr, verifier_ptr, parents_ptr, accepted_nodes_ptr, accept_len_ptr, bonus_ptr,
    packed_ptr, last_node_ptr,
    T, stride_cb, stride_ct, stride_vb, stride_vt, stride_p, stride_ab, stride_pb, MAX_DEPTH,
    BLOCK_T: tl.constexpr, EMIT: tl.constexpr,
):
    # EMIT: also write each sequence's packed row [accept_len, emitted tokens, -1 padding] and its
    # last accepted node, which a verify step otherwise assembles from the outputs in ~8 small kernels.
    b = tl.program_id(0).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    in_tree = offs_t < T
    # Padding nodes get parent -2: never equal to a real node id, so never a child.
    parents = tl.load(parents_ptr + offs_t * stride_p, mask=in_tree, other=-2).to(tl.int64)
    candidates = tl.load(candidates_ptr + b * stride_cb + offs_t * stride_ct, mask=in_tree, other=0)
    verifier_row = verifier_ptr + b * stride_vb
    out_row = accepted_nodes_ptr + b * stride_ab

    packed_row = packed_ptr + b * stride_pb

    tl.store(out_row, 0)                       # the root is always accepted
    current = tl.zeros((), dtype=tl.int64)     # last accepted node
    length = tl.full((), 1, dtype=tl.int64)
    alive = current == 0                       # still descending (a scalar True)
    for depth in range(1, MAX_DEPTH + 1):
        wanted = tl.load(verifier_row + current * stride_vt)
        is_match = (parents == current) & (candidates == wanted)
        first_match = tl.min(tl.where(is_match, offs_t, BLOCK_T), axis=0).to(tl.int64)
        found = alive & (first_match < T)
        current = tl.where(found, first_match, current)
        tl.store(out_row + depth, tl.where(found, first_match, -1))
        if EMIT:
            # Emitted token depth - 1: the accepted draft (it equals `wanted`); at the first depth
            # without a match, the bonus (the verifier's token there, `wanted` again); then -1.
            tl.store(packed_row + depth, tl.where(alive, wanted, -1))
        length += found.to(tl.int64)
        alive = found
    bonus = tl.load(verifier_row + current * stride_vt)
    tl.store(accept_len_ptr + b, length)
    tl.store(bonus_ptr + b, bonus)
    if EMIT:
        tl.store(packed_row, length)
        tl.store(packed_row + MAX_DEPTH + 1, tl.where(alive, bonus, -1))   # every depth accepted: the bonus
        tl.store(last_node_ptr + b, current)


@triton.jit
def _compact_kv_kernel(
    k_ptr, v_ptr, cache_seqlens_ptr, accepted_nodes_ptr, accept_len_ptr,
    B, F, Dh, W,
    stride_kl, stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vl, stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ab, stride_aw, stride_seqlens, stride_len,
    BLOCK_F: tl.constexpr,
):
    pid_lb = tl.program_id(0).to(tl.int64)
    layer = pid_lb // B
    b = pid_lb % B
    # Features f = h * Dh + d of one cache slot; strides allow any (Hkv, Dh) layout.
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = offs_f < F
    k_feature = (offs_f // Dh) * stride_kh + (offs_f % Dh) * stride_kd
    v_feature = (offs_f // Dh) * stride_vh + (offs_f % Dh) * stride_vd
    k_row = k_ptr + layer * stride_kl + b * stride_kb
    v_row = v_ptr + layer * stride_vl + b * stride_vb

    start = tl.load(cache_seqlens_ptr + b * stride_seqlens).to(tl.int64)
    n_accepted = tl.load(accept_len_ptr + b * stride_len)
    # Increasing j, load before store: see the module docstring for why the overlap is safe.
    for j in range(0, W):
        node = tl.load(accepted_nodes_ptr + b * stride_ab + j * stride_aw)
        # node == j: already in place (the root, and every chain prefix).
        if (j < n_accepted) & (node != j):
            src = start + node
            dst = start + j
            k = tl.load(k_row + src * stride_ks + k_feature, mask=f_ok)
            v = tl.load(v_row + src * stride_vs + v_feature, mask=f_ok)
            tl.store(k_row + dst * stride_ks + k_feature, k, mask=f_ok)
            tl.store(v_row + dst * stride_vs + v_feature, v, mask=f_ok)


# ============================================================================================
# Host launchers
# ============================================================================================
@eager_under_compile
def tree_accept_triton(candidates, verifier, parents, max_depth: int, emit: bool = False):
    """tree_accept's outputs; emit: also (packed (B, max_depth + 2), last_node (B,)), see tree_accept_tokens."""
    B, T = candidates.shape
    device = candidates.device
    accepted_nodes = torch.empty((B, max_depth + 1), dtype=torch.int64, device=device)
    accept_len = torch.empty(B, dtype=torch.int64, device=device)
    bonus = torch.empty(B, dtype=torch.int64, device=device)
    packed = torch.empty((B, max_depth + 2), dtype=torch.int64, device=device) if emit else accepted_nodes
    last_node = torch.empty(B, dtype=torch.int64, device=device) if emit else accept_len
    BLOCK_T = triton.next_power_of_2(T)
    _tree_accept_kernel[(B,)](
        candidates, verifier, parents, accepted_nodes, accept_len, bonus, packed, last_node,
        # Any strides: a verifier may be a column of (B, T, heads) tokens.
        T, *candidates.stride(), *verifier.stride(), parents.stride(0), accepted_nodes.stride(0), packed.stride(0),
        max_depth, BLOCK_T=BLOCK_T, EMIT=emit, num_warps=1 if interpreting() or BLOCK_T <= 128 else 4)
    return (accepted_nodes, accept_len, bonus) + ((packed, last_node) if emit else ())


@eager_under_compile
def compact_kv_cache_triton(k_cache, v_cache, cache_seqlens, accepted_nodes, accept_len) -> None:
    L, _, _, Hkv, Dh = k_cache.shape
    B, W = accepted_nodes.shape
    F = Hkv * Dh
    if interpreting():
        BLOCK_F, num_warps = min(triton.next_power_of_2(F), 256), 1
    else:
        # 1024 features x 2 bytes x (K + V) per step: 16-byte vectors across 4 warps.
        BLOCK_F, num_warps = min(triton.next_power_of_2(F), 1024), 4
    grid = (L * B, triton.cdiv(F, BLOCK_F))
    _compact_kv_kernel[grid](
        k_cache, v_cache, cache_seqlens, accepted_nodes, accept_len,
        B, F, Dh, W,
        *k_cache.stride(), *v_cache.stride(), *accepted_nodes.stride(), cache_seqlens.stride(0),
        accept_len.stride(0), BLOCK_F=BLOCK_F, num_warps=num_warps)
    cache_seqlens[:B] += accept_len.to(cache_seqlens.dtype)


# ============================================================================================
# Public functions
# ============================================================================================
# Depth of a parents tensor, checked once per tensor object: the caller builds its tree buffers
# once and passes the same tensor every step, so steps after the first read nothing back from the
# device (no host sync, and safe to call while capturing a CUDA graph). Keyed by id() with a weak
# reference to tell a live tensor from a new one at a recycled address (a WeakKeyDictionary would
# compare tensors with ==). An in-place change bumps the tensor's version and forces a re-check;
# inference-mode tensors keep no version counter, so they are checked again at every call, except
# inside a CUDA-graph capture (no host read possible there), where the last check is trusted.
_CHECKED_TREES: dict[int, tuple[weakref.ref, int | None, int]] = {}


def _tensor_version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:          # "Inference tensors do not track version counter"
        return None


def _forget_tree(ref: weakref.ref, key: int) -> None:
    entry = _CHECKED_TREES.get(key)
    if entry is not None and entry[0] is ref:
        del _CHECKED_TREES[key]


def _checked_max_depth(parents: torch.Tensor) -> int:
    key, version = id(parents), _tensor_version(parents)
    entry = _CHECKED_TREES.get(key)
    if entry is not None and entry[0]() is parents and (
            entry[1] == version if version is not None else graph_capturing(parents.device)):
        return entry[2]
    values = parents.tolist()
    if not values or values[0] != -1:
        raise ValueError(f"tree_accept: parents[0] must be -1 (node 0 is the root), got "
                         f"{values[0] if values else 'an empty tensor'}")
    for t, p in enumerate(values[1:], start=1):
        if not 0 <= p < t:
            raise ValueError(f"tree_accept: parents[{t}] = {p}; every node t >= 1 needs a parent in [0, t) "
                             "(nodes in BFS/depth order)")
    max_depth = max(reference.tree_depths(parents))
    ref = weakref.ref(parents, lambda dead, key=key: _forget_tree(dead, key))
    _CHECKED_TREES[key] = (ref, version, max_depth)
    return max_depth


def tree_accept(candidates: torch.Tensor, verifier: torch.Tensor, parents: torch.Tensor):
    """Accepted path of every sequence through a static token tree, one launch for the batch.

    candidates: (B, T) int64, the token at every node (column 0 = root token, never checked);
    verifier: (B, T) int64, the model's token (argmax or sample of head 0) after the path ending at
    each node; parents: (T,) int32/int64 with parents[0] = -1 and 0 <= parents[t] < t; all on one device.
    From the root, descend into the first child c (node order) with candidates[b, c] ==
    verifier[b, current]; stop when no child matches.
    Returns accepted_nodes (B, max_depth + 1) int64 (root first, padded with -1), accept_len (B,)
    int64 (>= 1, root included), bonus (B,) int64 = verifier[b, last accepted node].
    The tree is checked (and its depth read) on the host the first time a parents tensor is seen.
    """
    max_depth = _check_accept_inputs("tree_accept", candidates, verifier, parents)
    if candidates.shape[0] == 0 or not use_triton(candidates, verifier, parents):
        return reference.tree_accept(candidates, verifier, parents)
    return tree_accept_triton(candidates, verifier, parents, max_depth)


def tree_accept_tokens(candidates: torch.Tensor, verifier: torch.Tensor, parents: torch.Tensor):
    """`tree_accept` and the tokens it makes each sequence emit, from the same launch.

    Arguments as tree_accept's. Returns (accepted_nodes (B, W), packed (B, 1 + W), bonus (B,),
    last_node (B,)), all int64, W = max_depth + 1: packed[b, 0] = accept_len[b], then the
    accept_len[b] emitted tokens (the candidates at the accepted nodes below the root, then the
    bonus), then -1; last_node[b] = the last accepted node, whose heads draft the next step.
    """
    max_depth = _check_accept_inputs("tree_accept_tokens", candidates, verifier, parents)
    if candidates.shape[0] == 0 or not use_triton(candidates, verifier, parents):
        return reference.tree_accept_tokens(candidates, verifier, parents)
    accepted_nodes, _, bonus, packed, last_node = tree_accept_triton(candidates, verifier, parents, max_depth,
                                                                     emit=True)
    return accepted_nodes, packed, bonus, last_node


def _check_accept_inputs(name: str, candidates, verifier, parents) -> int:
    """Types, shapes, dtypes and devices of a tree_accept call; the tree's depth (checked once)."""
    for arg, t in (("candidates", candidates), ("verifier", verifier), ("parents", parents)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if candidates.dim() != 2 or verifier.shape != candidates.shape:
        raise ValueError(f"{name}: candidates and verifier must both be (B, T), got "
                         f"{tuple(candidates.shape)} and {tuple(verifier.shape)}")
    if candidates.dtype != torch.int64 or verifier.dtype != torch.int64:
        raise ValueError(f"{name}: candidates and verifier must be int64, got {candidates.dtype} "
                         f"and {verifier.dtype}")
    if parents.dim() != 1 or parents.shape[0] != candidates.shape[1]:
        raise ValueError(f"{name}: parents must be (T,) = ({candidates.shape[1]},), got {tuple(parents.shape)}")
    if parents.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{name}: parents must be int32 or int64, got {parents.dtype}")
    check_one_device(name, candidates=candidates, verifier=verifier, parents=parents)
    return _checked_max_depth(parents)


def _check_compaction_values(k_cache, cache_seqlens, accepted_nodes, accept_len) -> None:
    """Value checks that read the tensors: done for CPU tensors only (on CUDA they would cost a
    host sync per step; the generator's own bookkeeping guarantees them there)."""
    S = k_cache.shape[2]
    W = accepted_nodes.shape[1]
    starts = cache_seqlens[:accepted_nodes.shape[0]].tolist()
    for b, (n, nodes) in enumerate(zip(accept_len.tolist(), accepted_nodes.tolist())):
        if not 0 <= n <= W:
            raise ValueError(f"compact_kv_cache: accept_len[{b}] = {n} is outside [0, {W}]")
        if n == 0:
            continue
        if starts[b] < 0:
            raise ValueError(f"compact_kv_cache: cache_seqlens[{b}] = {starts[b]} is negative")
        for j, node in enumerate(nodes[:n]):
            if node < j:
                raise ValueError(f"compact_kv_cache: accepted_nodes[{b}, {j}] = {node} < {j}: not a root path "
                                 "of a tree in depth order")
            if starts[b] + node >= S:
                raise ValueError(f"compact_kv_cache: sequence {b}: slot cache_seqlens + accepted_nodes[{b}, {j}] = "
                                 f"{starts[b]} + {node} is past the cache end (S = {S})")


def compact_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     accepted_nodes: torch.Tensor, accept_len: torch.Tensor) -> None:
    """Keep the accepted tree nodes' K/V in consecutive cache slots, all layers in one launch; in place.

    k_cache, v_cache: (L, B_max, S, Hkv, Dh), same shape, dtype and device (the model's stacked caches);
    cache_seqlens: (B_max,) or (B,) int32, tokens cached before the tree, advanced in place by accept_len;
    accepted_nodes: (B, W) int64 from `tree_accept`, B <= B_max; accept_len: (B,) int32/int64, 0 for a
    row to leave alone (a finished sequence).
    For every layer and b < B, j < accept_len[b]: slot cache_seqlens[b] + j <- slot
    cache_seqlens[b] + accepted_nodes[b, j]. Other slots and rows are untouched.
    On CPU the values are checked too (accept_len in [0, W], accepted_nodes[b, j] >= j, slots inside S).
    """
    tensors = (("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens),
               ("accepted_nodes", accepted_nodes), ("accept_len", accept_len))
    for arg, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"compact_kv_cache: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if k_cache.dim() != 5 or k_cache.shape != v_cache.shape:
        raise ValueError(f"compact_kv_cache: k_cache and v_cache must both be (L, B_max, S, Hkv, Dh), got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"compact_kv_cache: k_cache dtype {k_cache.dtype} != v_cache dtype {v_cache.dtype}")
    refuse_shared_caches("compact_kv_cache", k_cache, v_cache, "it would be compacted twice")
    B_max = k_cache.shape[1]
    if accepted_nodes.dim() != 2 or accepted_nodes.shape[0] > B_max:
        raise ValueError(f"compact_kv_cache: accepted_nodes must be (B, W) with B <= B_max = {B_max}, "
                         f"got {tuple(accepted_nodes.shape)}")
    if accepted_nodes.dtype != torch.int64:
        raise ValueError(f"compact_kv_cache: accepted_nodes must be int64, got {accepted_nodes.dtype}")
    B = accepted_nodes.shape[0]
    if accept_len.shape != (B,) or accept_len.dtype not in _INDEX_DTYPES:
        raise ValueError(f"compact_kv_cache: accept_len must be ({B},) int32/int64, got "
                         f"{tuple(accept_len.shape)} {accept_len.dtype}")
    if cache_seqlens.dtype != torch.int32 or cache_seqlens.shape not in ((B_max,), (B,)):
        raise ValueError(f"compact_kv_cache: cache_seqlens must be int32 of shape ({B_max},) or ({B},), got "
                         f"{tuple(cache_seqlens.shape)} {cache_seqlens.dtype}")
    check_one_device("compact_kv_cache", **dict(tensors))
    if k_cache.device.type == "cpu":
        _check_compaction_values(k_cache, cache_seqlens, accepted_nodes, accept_len)
    if B == 0:
        return
    if k_cache.numel() == 0 or not use_triton(k_cache, v_cache, cache_seqlens, accepted_nodes, accept_len):
        reference.compact_kv_cache(k_cache, v_cache, cache_seqlens, accepted_nodes, accept_len)
        return
    compact_kv_cache_triton(k_cache, v_cache, cache_seqlens, accepted_nodes, accept_len)

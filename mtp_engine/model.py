"""The MTP transformer, layer for layer the one Meta released with its multi-token checkpoints.

A Llama decoder whose last block forks: trunk `layers[:-1]`, then n prediction heads
(`layers[-1]` is head 0, `extra_heads[j]` is head j+1), each a full transformer block applied to
the trunk output, then the shared `norm` and `output`. Head i at position t predicts token t+1+i.

Parameter names match the release's state dict, so `consolidated.NN.pth` loads unchanged.
Attention and RMSNorm go through `mtp_kernels` (Triton on CUDA, PyTorch reference on CPU).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.utils.checkpoint
from torch import nn

from mtp_kernels import add_rms_norm, rms_norm, rope_cache_write, swiglu
from mtp_kernels.attention import flash_attention
from mtp_kernels.kv_cache_attention import PackedTreeMask, kv_cache_attention, pack_tree_mask
from mtp_kernels.reference import apply_rotary as apply_rotary_emb
from mtp_kernels.skinny_fused import skinny_linear_rope, skinny_linear_swiglu
from mtp_kernels.skinny_linear import skinny_linear
from mtp_kernels.skinny_norm import NormPrologue

from .branches import run_branches


@dataclass
class ModelArgs:
    """The fields of Meta's params.json (plus the generation-time sizes the release also keeps)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_batch_size: int = 32
    max_seq_len: int = 2048
    n_future_tokens: int = 1

    @classmethod
    def from_dict(cls, params: dict, source: str = "params") -> "ModelArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; known keys are {sorted(known)}")
        args = cls(**params)
        args.validate(source)
        return args

    @classmethod
    def from_json(cls, path) -> "ModelArgs":
        with open(path) as f:
            return cls.from_dict(json.load(f), source=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_trunk_layers(self) -> int:
        return self.n_layers - self.n_future_tokens

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's rule: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def validate(self, source: str = "params") -> None:
        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("dim", "n_layers", "n_heads", "multiple_of", "max_batch_size", "max_seq_len", "n_future_tokens"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{source}: {name} must be a positive int, got {value!r}")
        if not is_int(self.vocab_size):
            raise ValueError(f"{source}: vocab_size must be an int, got {self.vocab_size!r}")
        if self.n_kv_heads is not None and (not is_int(self.n_kv_heads) or self.n_kv_heads < 1):
            raise ValueError(f"{source}: n_kv_heads must be null or a positive int, got {self.n_kv_heads!r}")
        if self.ffn_dim_multiplier is not None and (not is_number(self.ffn_dim_multiplier)
                                                    or self.ffn_dim_multiplier <= 0):
            raise ValueError(f"{source}: ffn_dim_multiplier must be null or a positive number, "
                             f"got {self.ffn_dim_multiplier!r}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not is_number(value) or value <= 0:
                raise ValueError(f"{source}: {name} must be a positive finite number, got {value!r}")
        if self.vocab_size <= 0:
            raise ValueError(f"{source}: vocab_size must be set (got {self.vocab_size}); "
                             "Meta's params.json may say -1: take it from the tokenizer")
        if self.dim % self.n_heads:
            raise ValueError(f"{source}: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"{source}: head dim {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"{source}: n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads}")
        if self.n_future_tokens < 1:
            raise ValueError(f"{source}: n_future_tokens must be >= 1 (got {self.n_future_tokens})")
        if self.n_trunk_layers < 0:
            raise ValueError(f"{source}: n_layers {self.n_layers} must count the {self.n_future_tokens} head blocks")
        if self.ffn_hidden_dim == 0:   # Meta's rule rounds int(multiplier * hidden) == 0 up to 0
            raise ValueError(f"{source}: the feed-forward width comes out 0 (dim {self.dim}, ffn_dim_multiplier "
                             f"{self.ffn_dim_multiplier}, multiple_of {self.multiple_of}): every block would lose "
                             "its feed-forward; raise ffn_dim_multiplier")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def ensure_fits(nbytes: int, device: Union[str, torch.device], what: str) -> None:
    """A ValueError naming `what` when it alone needs more memory than the device has in all: past
    that, an allocation ends in the allocator's error from deep inside torch, or on Linux in the OOM
    killer (a --max-seq-len of 10^8 asks for a 19 GB rotary table)."""
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    elif device.type == "cpu" and hasattr(os, "sysconf"):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return
    if nbytes > total:
        raise ValueError(f"{what} needs {nbytes / 2 ** 30:.1f} GiB, more than the {total / 2 ** 30:.1f} GiB "
                         f"this {device.type} device has")


def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """Complex rotations (end, head_dim/2) for the interleaved rotary form: pairs (0,1), (2,3), ..."""
    # the angles (float32) and the table (complex64) are alive together
    ensure_fits(end * (head_dim // 2) * 12, "cpu", f"a rotary table of {end} positions (2 x max_seq_len)")
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    t = torch.arange(end, dtype=torch.float32)
    return torch.polar(torch.ones(end, head_dim // 2), torch.outer(t, freqs))


class KVCache(nn.Module):
    """Static per-block cache. k, v: (max_batch, max_seq, n_kv_heads, head_dim).

    Built by `Transformer.setup_caches` as views of one stacked (n_blocks, ...) tensor per K and V,
    so that one kernel launch can touch every layer's cache (speculative KV compaction). New tokens
    are written by `rope_cache_write`, which rotates k on the way in.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)


@dataclass
class CacheStep:
    """Where a cached forward reads and writes, computed once and shared by every block.

    cache_seqlens: (B,) tokens already cached per sequence; slots: (B, T) int64 cache slot of each
    new token (cache_seqlens + j); tree_mask: which new tokens each new token sees, a (T, T) bool
    mask packed for the kernel (None means causal); first_row: sequence b is the cache's row
    first_row + b.
    """

    cache_seqlens: torch.Tensor
    slots: torch.Tensor
    tree_mask: Optional[PackedTreeMask] = None
    first_row: int = 0


class Linear(nn.Linear):
    """nn.Linear for a block's projections (same parameters, state dict and hooks). Without autograd
    a few rows (a decode step) go through `skinny_linear`: cuBLAS or the weight-streaming kernel,
    whichever was measured faster for the shape on this GPU; everything else, and everything under
    torch.compile (which plans its own GEMMs), is F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return skinny_linear(x, self.weight)
        return super().forward(x)


def fuse_rows(*linears: nn.Linear) -> None:
    """Store the weights of `linears` back to back in one tensor and make each weight a view of its
    rows, so that `rows_view` can multiply by all of them in one GEMM. Values, parameters and
    state-dict names are unchanged (an optimizer keeps its parameters); `.to()` or loading separate
    tensors undoes it, and the model then runs the separate GEMMs again."""
    with torch.no_grad():
        if rows_view(*linears) is not None:   # already fused: keep the storage (captured CUDA graphs read it)
            return
        fused = torch.cat([lin.weight for lin in linears])
        start = 0
        for lin in linears:
            rows = lin.weight.shape[0]
            lin.weight.data = fused[start:start + rows]
            start += rows


def rows_view(*linears: nn.Linear) -> Optional[torch.Tensor]:
    """The (sum of out_features, in_features) weight of `linears` as one view, when `fuse_rows` laid
    them out back to back (and nothing has moved them since); else None. Inference only: a view
    through the first weight would send every gradient to it. None under torch.compile too: the
    compiler cannot follow data pointers, and it plans the projections' GEMMs itself."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    first = linears[0].weight
    expected = first.data_ptr()
    for lin in linears:
        w = lin.weight
        if w.dtype != first.dtype or w.device != first.device or not w.is_contiguous() or w.data_ptr() != expected:
            return None
        expected += w.numel() * w.element_size()
    if first.untyped_storage().nbytes() < expected - first.untyped_storage().data_ptr():
        return None
    rows = sum(lin.weight.shape[0] for lin in linears)
    return first.detach().as_strided((rows, first.shape[1]), (first.shape[1], 1))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.kv_heads
        self.head_dim = args.head_dim
        self.wq = Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, step: Optional[CacheStep]) -> torch.Tensor:
        B, T, _ = x.shape
        if step is not None and self.cache is None:
            raise RuntimeError("cached forward needs Transformer.setup_caches(...) first")
        wqkv = rows_view(self.wq, self.wk, self.wv)
        if step is not None and wqkv is not None:
            # One GEMM for q, k and v (Transformer.fuse_projections), then q and k rotated and k, v
            # written into the cache: one kernel on a GPU (rope_cache.py), or none where the GEMM's
            # epilogue was timed faster doing it (skinny_linear_rope). forward_cached checked the
            # slots' lengths once for all blocks: no per-layer check (host sync).
            q = skinny_linear_rope(x, wqkv, self.n_heads, self.n_kv_heads, freqs_cis, step.slots,
                                   *self.cache_rows(step, B), check_slots=False)
        else:
            if wqkv is not None:
                q, k, v = skinny_linear(x, wqkv).split([self.wq.out_features, self.wk.out_features,
                                                        self.wv.out_features], -1)
            else:
                q, k, v = self.wq(x), self.wk(x), self.wv(x)
            q = q.view(B, T, self.n_heads, self.head_dim)
            k = k.view(B, T, self.n_kv_heads, self.head_dim)
            v = v.view(B, T, self.n_kv_heads, self.head_dim)
            if step is None:
                q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
                return self.wo(flash_attention(q, k, v, causal=True).reshape(B, T, -1))
            q = rope_cache_write(q, k, v, freqs_cis, step.slots, *self.cache_rows(step, B), check_slots=False)
        return self.attend(q, step)

    def cache_rows(self, step: CacheStep, batch: int):
        """The (batch, S, Hkv, Dh) views of the K and V caches that this step's sequences use."""
        rows = slice(step.first_row, step.first_row + batch)
        return self.cache.k[rows], self.cache.v[rows]

    def attend(self, q: torch.Tensor, step: CacheStep) -> torch.Tensor:
        """Rotated q (B, T, H, Dh) against the cache (its k, v already written): wo of the attention."""
        B, T = q.shape[:2]
        out = kv_cache_attention(q, *self.cache_rows(step, B), step.cache_seqlens, step.tree_mask,
                                 check_seqlens=False)
        return self.wo(out.reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=False)
        self.w2 = Linear(hidden_dim, dim, bias=False)
        self.w3 = Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w13 = rows_view(self.w1, self.w3)
        if w13 is not None:
            # One GEMM for the gate and the up projection (Transformer.fuse_projections); on a GPU
            # decode step SwiGLU may run in its epilogue, where that was timed faster.
            return self.w2(skinny_linear_swiglu(x, w13))
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        # Activation checkpointing (Transformer.set_activation_checkpointing): a plain attribute, so
        # the state dict and the checkpoint files do not change.
        self.checkpoint_activations = False

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, step: Optional[CacheStep] = None,
                delta: Optional[torch.Tensor] = None, unadded: bool = False):
        """The block on the input x + delta (delta None: x). Returns its output, or with unadded=True
        a pair (h, delta') whose sum is the output: the last residual add is then left to the next
        norm, which does it in the same pass (add_rms_norm: one kernel on a GPU without autograd), as
        the add before ffn_norm is. (Blocks are called, not their methods, so that module hooks,
        FSDP's among them, run.)
        With checkpoint_activations set, a forward under autograd keeps only the block's inputs for
        the backward, which runs the block's forward again first (torch.utils.checkpoint, the
        non-reentrant kind that DDP, FSDP2 and torch.compile take). The block draws no random numbers,
        so no RNG state is saved for the second run."""
        if step is not None and not torch.is_grad_enabled():
            attention, ffn = self.attention, self.feed_forward
            wqkv, w13 = rows_view(attention.wq, attention.wk, attention.wv), rows_view(ffn.w1, ffn.w3)
            if wqkv is not None and w13 is not None and attention.cache is not None:
                return self._cached_step(x, delta, freqs_cis, step, wqkv, w13, unadded)
        if self.checkpoint_activations and step is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, freqs_cis, None, delta, unadded,
                                                     use_reentrant=False, preserve_rng_state=False)
        return self._forward(x, freqs_cis, step, delta, unadded)

    def _forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, step: Optional[CacheStep],
                 delta: Optional[torch.Tensor], unadded: bool):
        if delta is None:
            normed = self.attention_norm(x)
        else:
            x, normed = add_rms_norm(x, delta, self.attention_norm.weight, self.attention_norm.eps)
        x, normed = add_rms_norm(x, self.attention(normed, freqs_cis, step), self.ffn_norm.weight, self.ffn_norm.eps)
        out = self.feed_forward(normed)
        return (x, out) if unadded else x + out

    def _cached_step(self, x, delta, freqs_cis, step: CacheStep, wqkv, w13, unadded: bool):
        """The block of a cached inference step with fused projections (Transformer.fuse_projections):
        each residual add and norm goes into the projection that reads it (`NormPrologue`), which on a
        GPU decode step runs them in that GEMM's launch where that was timed faster; elsewhere they
        are add_rms_norm as in `forward`. Same arguments and result as `forward`. Inference only: it
        calls the attention's and the norms' parts, not those modules, so hooks on them do not run;
        wo and w2 stay module calls (tensor parallelism's all-reduce hooks sit there)."""
        attention = self.attention
        q, x = skinny_linear_rope(x, wqkv, attention.n_heads, attention.n_kv_heads, freqs_cis, step.slots,
                                  *attention.cache_rows(step, x.shape[0]), check_slots=False,
                                  norm=NormPrologue(self.attention_norm.weight, self.attention_norm.eps, delta))
        hidden, x = skinny_linear_swiglu(x, w13, norm=NormPrologue(self.ffn_norm.weight, self.ffn_norm.eps,
                                                                   attention.attend(q, step)))
        out = self.feed_forward.w2(hidden)
        return (x, out) if unadded else x + out


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        params.validate()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.n_future_tokens = params.n_future_tokens
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        # `layers` = trunk + head 0, `extra_heads` = heads 1..n-1: the release's module names.
        self.layers = nn.ModuleList(TransformerBlock(params) for _ in range(params.n_trunk_layers + 1))
        self.extra_heads = nn.ModuleList(TransformerBlock(params) for _ in range(params.n_future_tokens - 1))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        # A plain attribute, as in the release: a buffer would follow `.to(dtype)` and lose the
        # imaginary part. It follows the model's device lazily (see `_rope`).
        self.freqs_cis = precompute_freqs_cis(params.head_dim, params.max_seq_len * 2, params.rope_theta)
        self.cache_batch = 0
        self._told_cached_forward_is_inference = False
        self.cache_len = 0
        self.k_cache: Optional[torch.Tensor] = None  # (n_blocks, B, S, Hkv, Dh) after setup_caches
        self.v_cache: Optional[torch.Tensor] = None
        # Head blocks as concurrent branches of captured CUDA graphs (branches.run_branches); off
        # where the blocks communicate (tensor parallelism) or to measure the difference.
        self.concurrent_heads = True

    # ---------------------------------------------------------------- structure
    @property
    def trunk(self):
        return self.layers[:-1]

    @property
    def heads(self) -> list:
        return [self.layers[-1], *self.extra_heads]

    def blocks(self) -> list:
        return [*self.layers, *self.extra_heads]

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Checkpoint every block's activations in training forwards (TransformerBlock.forward): the
        backward recomputes each block's forward from its input, so the activations kept between
        forward and backward are one (B, T, D) input per block instead of everything each block
        computes (q, k, v, the attention output and its log-sum-exp, the norms, the feed-forward's
        2 x ffn_dim), for one more forward of the blocks. What the step keeps beside the blocks' inputs
        is unchanged: the final norm's input over the stacked heads and the fused loss's gradients (dH,
        n x B x T x D, and dW). The same ops run on the same inputs: the same results and gradients,
        bit for bit on the CPU. Forward hooks on a block's submodules run twice per step (forward and
        recompute); hooks on the block itself, FSDP's among them, once. Inference (no autograd, or a
        KV-cache step) is not affected."""
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled must be True or False, got {enabled!r}")
        for block in self.blocks():
            block.checkpoint_activations = enabled

    def fuse_projections(self) -> None:
        """Lay out each block's wq/wk/wv and w1/w3 weights back to back, so that inference
        (no autograd) runs one GEMM for q, k, v and one for the gate and up projections: on a
        GPU decode step, 4 projection GEMMs per block instead of 7. Values are unchanged; `.to()`
        undoes it (call again after). The Generator calls it."""
        for block in self.blocks():
            fuse_rows(block.attention.wq, block.attention.wk, block.attention.wv)
            fuse_rows(block.feed_forward.w1, block.feed_forward.w3)

    # ---------------------------------------------------------------- caches
    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype=None, device=None) -> None:
        """Allocate a static KV cache in every trunk and head block."""
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"setup_caches: {name} must be a positive int, got {value!r}")
        dtype = dtype or self.output.weight.dtype
        device = device or self.output.weight.device
        blocks = self.blocks()
        # The blocks' own KV-head count: a tensor-parallel rank holds only its share of the heads.
        shape = (len(blocks), max_batch_size, max_seq_len, blocks[0].attention.n_kv_heads, self.params.head_dim)
        ensure_fits(2 * math.prod(shape) * dtype.itemsize, device,
                    f"the KV caches for max_batch_size {max_batch_size} x max_seq_len {max_seq_len}")
        if max_seq_len > 2 * self.params.max_seq_len:
            self._grow_rope(max_seq_len)
        self.clear_caches()   # a re-size frees the old cache first: never two caches in memory at once
        # One tensor per K and V for all blocks, in `blocks()` order: (n_blocks, B, S, Hkv, Dh).
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        for i, block in enumerate(blocks):
            block.attention.cache = KVCache(self.k_cache[i], self.v_cache[i])
        self.cache_batch, self.cache_len = max_batch_size, max_seq_len

    def _apply(self, fn, *args, **kwargs):
        """`.to()`, `.half()`, `.cuda()`, ... convert each block's cache buffers one by one, which would
        cut them loose from the stacked k_cache / v_cache that KV compaction and CUDA graphs use (a
        silent stale copy). Caches are scratch: they are set up again, empty, at the new dtype and
        device (the weights')."""
        cached = (self.cache_batch, self.cache_len) if self.cache_len else None
        if cached:
            self.clear_caches()
        module = super()._apply(fn, *args, **kwargs)
        if cached:
            self.setup_caches(*cached)
        return module

    def copy_cache_prefix(self, src_row: int, dst_row: int, length: int) -> None:
        """Copy cache row src_row's first `length` slots (K and V of every trunk and head block, one
        copy each) into row dst_row: a sequence whose first `length` tokens equal src_row's then
        attends to them as if it had computed them (a shared prompt prefix, `Generator`). K is
        stored rotated by its absolute position, which the copy keeps."""
        if self.k_cache is None:
            raise RuntimeError("copy_cache_prefix needs Transformer.setup_caches(...) first")
        for name, row in (("src_row", src_row), ("dst_row", dst_row)):
            if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < self.cache_batch:
                raise ValueError(f"copy_cache_prefix: {name} must be a cache row in [0, {self.cache_batch}), "
                                 f"got {row!r}")
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self.cache_len:
            raise ValueError(f"copy_cache_prefix: length must be an int in [0, {self.cache_len}], got {length!r}")
        if src_row != dst_row and length:
            self.k_cache[:, dst_row, :length] = self.k_cache[:, src_row, :length]
            self.v_cache[:, dst_row, :length] = self.v_cache[:, src_row, :length]

    def clear_caches(self) -> None:
        for block in self.blocks():
            block.attention.cache = None
        self.k_cache = self.v_cache = None
        self.cache_batch = self.cache_len = 0

    def _grow_rope(self, length: int) -> None:
        self.freqs_cis = precompute_freqs_cis(self.params.head_dim, length, self.params.rope_theta)

    def _rope(self, device: torch.device) -> torch.Tensor:
        if self.freqs_cis.device != device:
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis

    # ---------------------------------------------------------------- forward passes
    def _run(self, tokens: torch.Tensor, freqs_cis: torch.Tensor, step: Optional[CacheStep], n_heads: int):
        """Trunk once, then the first `n_heads` heads. Returns normed hidden (B, T, n_heads, D)."""
        if torch.is_grad_enabled():
            # Under autograd add_rms_norm is a plain add and a norm anyway: add the trunk's output once
            # (not once per head) and stack the heads' outputs once (not their two unadded halves).
            x = self._trunk(tokens, freqs_cis, step)
            return self.norm(torch.stack([head(x, freqs_cis, step) for head in self.heads[:n_heads]], dim=-2))
        h, delta = self._trunk_parts(tokens, freqs_cis, step)
        # The heads read the trunk's output and nothing from each other: inside a CUDA-graph capture
        # they become parallel branches of the graph (branches.py).
        parts = run_branches([functools.partial(head, h, freqs_cis, step, delta=delta, unadded=True)
                              for head in self.heads[:n_heads]], h.device, self.concurrent_heads)
        # One add + final norm over all heads (a plain decode step's single head needs no stack).
        if len(parts) == 1:
            hs, deltas = parts[0][0].unsqueeze(-2), parts[0][1].unsqueeze(-2)
        else:
            hs, deltas = (torch.stack([part[i] for part in parts], dim=-2) for i in (0, 1))
        return add_rms_norm(hs, deltas, self.norm.weight, self.norm.eps)[1]

    def _trunk_parts(self, tokens: torch.Tensor, freqs_cis: torch.Tensor, step: Optional[CacheStep] = None):
        """The trunk's output as (h, delta), h + delta unadded (see TransformerBlock.forward)."""
        h, delta = self.tok_embeddings(tokens), None
        for layer in self.trunk:
            h, delta = layer(h, freqs_cis, step, delta=delta, unadded=True)
        return h, delta

    def _trunk(self, tokens: torch.Tensor, freqs_cis: torch.Tensor, step: Optional[CacheStep] = None):
        """The trunk's output (B, T, D). Under autograd each block adds its own residual (the next
        block's add + norm is a plain add and a norm there anyway, the same ops in the same order), so
        a checkpointed block keeps one input, not the unadded pair."""
        if torch.is_grad_enabled():
            h = self.tok_embeddings(tokens)
            for layer in self.trunk:
                h = layer(h, freqs_cis, step)
            return h
        h, delta = self._trunk_parts(tokens, freqs_cis, step)
        return h if delta is None else h + delta

    def trunk_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Trunk output (B, T, D) of a plain causal forward: the input of every head block.

        With `head_hidden_from_trunk` this splits `head_hidden` for the paper's memory-efficient
        schedule (each head's forward and backward in turn, then the trunk's backward once).
        """
        self._check_tokens(tokens, True)
        return self._trunk(tokens, self._rope(tokens.device)[: tokens.shape[1]])

    def head_hidden_from_trunk(self, trunk_out: torch.Tensor, head: int) -> torch.Tensor:
        """Normed hidden (B, T, D) of head `head` (0-based) given the trunk output (B, T, D)."""
        if not 0 <= head < self.n_future_tokens:
            raise ValueError(f"head {head} is outside [0, {self.n_future_tokens})")
        freqs = self._rope(trunk_out.device)[: trunk_out.shape[1]]
        return self.norm(self.heads[head](trunk_out, freqs, None))

    def forward(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0,
                return_all_heads: bool = False) -> torch.Tensor:
        """The release's forward: float logits (B, T, n_used, V), n_used = n_future_tokens or 1.

        Without caches this is a plain causal forward over `tokens` from position 0. With caches
        (setup_caches) it appends to them at start_pos, an int or a (B,) integer tensor of
        per-sequence positions, like the release's inference path. start_pos > 0 without caches is
        an error: the release's model always has its cache, and a forward at shifted positions
        without the earlier tokens would silently drop their context. The cached path is inference
        only, as the release's: it builds no autograd graph (warned once where autograd was on).
        """
        n_used = self.n_future_tokens if return_all_heads else 1
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            self._check_tokens(tokens, False)   # the error naming what tokens is
        B = tokens.shape[0]
        if isinstance(start_pos, torch.Tensor):
            if start_pos.is_floating_point() or start_pos.is_complex() or start_pos.dtype == torch.bool \
                    or start_pos.shape not in ((), (B,)):
                raise ValueError(f"start_pos must be an int or a ({B},) integer tensor, got "
                                 f"{start_pos.dtype} {tuple(start_pos.shape)}")
        elif isinstance(start_pos, bool) or not isinstance(start_pos, int):
            raise ValueError(f"start_pos must be an int or a ({B},) integer tensor, got {start_pos!r}")
        elif start_pos < 0:
            raise ValueError(f"start_pos must be >= 0, got {start_pos}")
        if self.cache_len:
            # The release's forward is inference only (@torch.inference_mode()), and the cached path
            # writes the caches in place outside autograd: under autograd its gradients would be
            # silently wrong (none for q/k/v), so it runs without a graph, as the release's does.
            if torch.is_grad_enabled() and not self._told_cached_forward_is_inference \
                    and any(p.requires_grad for p in self.parameters()):
                self._told_cached_forward_is_inference = True
                warnings.warn("model(tokens) with KV caches set up (a Generator was built on this model) is the "
                              "release's inference path and builds no autograd graph; call model.clear_caches() "
                              "to train through model(tokens)", stacklevel=2)
            self._check_tokens(tokens, False)
            # The range is checked before the int32 cast: 2**32 would wrap to slot 0 and overwrite it.
            seqlens = torch.as_tensor(start_pos, device=tokens.device).expand(B)
            self._check_cache_range(seqlens, tokens.shape[1], "start_pos")
            seqlens = seqlens.to(torch.int32)
            with torch.no_grad():   # tokens and lengths checked above: not again
                hidden = self.forward_cached(tokens, seqlens, n_heads=n_used, check_lengths=False)
                return self.output(hidden).float()
        if not isinstance(start_pos, int) or start_pos != 0:
            raise ValueError(f"start_pos {start_pos} needs the KV cache: call setup_caches(max_batch_size, "
                             "max_seq_len) first (the release's model sets its cache up when built); without "
                             "it, forward runs a whole sequence from position 0")
        self._check_tokens(tokens, True)
        freqs = self._rope(tokens.device)[:tokens.shape[1]]
        return self.output(self._run(tokens, freqs, None, n_used)).float()

    def head_hidden(self, tokens: torch.Tensor, n_heads: Optional[int] = None) -> torch.Tensor:
        """Normed hidden states of every head, (n, B, T, D): the input of the fused n-head loss."""
        self._check_tokens(tokens, True)
        n_heads = self._checked_heads(n_heads)
        h = self._run(tokens, self._rope(tokens.device)[: tokens.shape[1]], None, n_heads)
        return h.permute(2, 0, 1, 3)

    def forward_cached(self, tokens: torch.Tensor, cache_seqlens: torch.Tensor, *,
                       node_depths: Optional[torch.Tensor] = None,
                       tree_mask: Union[None, torch.Tensor, PackedTreeMask] = None,
                       n_heads: Optional[int] = None, check_lengths: bool = True,
                       first_row: int = 0) -> torch.Tensor:
        """Append `tokens` (B, T) to the caches and return normed hidden (B, T, n_heads, D).

        cache_seqlens: (B,) int, tokens already cached per sequence (not advanced here: the caller
        owns it). New token j is written to slot cache_seqlens + j. For a token tree, node_depths
        (T,) gives each node's depth below the last accepted token (its rotary position is
        cache_seqlens + depth) and tree_mask (T, T) bool says which nodes each node sees (or its
        `pack_tree_mask`, which a caller that reuses one tree keeps; a bool mask is packed here once
        for all layers).
        check_lengths: verify 0 <= cache_seqlens <= cache_len - T and the token ids (host syncs); a
        caller that tracks the lengths on the host and checked its tokens (the Generator) turns it off.
        first_row: sequence b lives in the cache's row first_row + b (a batch prefilled in groups of
        similar prompt length gives each group its own rows).
        """
        if not self.cache_len:
            raise RuntimeError("forward_cached needs setup_caches(max_batch_size, max_seq_len) first")
        n_heads = self._checked_heads(n_heads)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError("tokens must be (batch, seq), a tensor; got "
                             f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        if check_lengths:   # the same host sync allows the token ids' range check
            self._check_tokens(tokens, False)
        B, T = tokens.shape
        if isinstance(first_row, bool) or not isinstance(first_row, int) or first_row < 0:
            raise ValueError(f"first_row must be an int >= 0, got {first_row!r}")
        if first_row + B > self.cache_batch:
            raise ValueError(f"batch {B} from row {first_row} exceeds the cache's max_batch_size {self.cache_batch}")
        if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.is_floating_point() \
                or cache_seqlens.is_complex() or cache_seqlens.dtype == torch.bool:
            raise ValueError("cache_seqlens must be a (B,) integer tensor, got "
                             f"{getattr(cache_seqlens, 'dtype', type(cache_seqlens).__name__)}")
        if cache_seqlens.shape != (B,):
            raise ValueError(f"cache_seqlens must have shape ({B},), got {tuple(cache_seqlens.shape)}")
        if check_lengths:   # before the int32 cast: 2**32 would wrap to slot 0
            self._check_cache_range(cache_seqlens, T, "cache_seqlens")
        cache_seqlens = cache_seqlens.to(device=tokens.device, dtype=torch.int32)
        if node_depths is not None:
            node_depths = self._checked_depths(node_depths, cache_seqlens, T, check_lengths)
        offsets = torch.arange(T, device=tokens.device)
        slots = cache_seqlens[:, None].long() + offsets
        positions = slots if node_depths is None else cache_seqlens[:, None].long() + node_depths.long()
        if self.freqs_cis.shape[0] < self.cache_len:
            self._grow_rope(self.cache_len)
        freqs = self._rope(tokens.device)[positions]  # (B, T, Dh/2)
        if isinstance(tree_mask, torch.Tensor):
            tree_mask = pack_tree_mask(tree_mask.to(tokens.device))
        step = CacheStep(cache_seqlens, slots, tree_mask, first_row)
        return self._run(tokens, freqs, step, n_heads)

    def _check_cache_range(self, lengths: torch.Tensor, T: int, name: str) -> None:
        """ValueError unless every length in `lengths` (integers) leaves room for T new tokens."""
        lengths = lengths.to(torch.int64)   # compared in its own dtype, uint8 100 > 300 would be True
        if lengths.numel() and bool(((lengths < 0) | (lengths > self.cache_len - T)).any()):
            raise ValueError(f"{name} {lengths.tolist()} + {T} new tokens do not fit the cache length {self.cache_len} "
                             f"(each must be in [0, {self.cache_len - T}])")

    def _checked_depths(self, node_depths, cache_seqlens: torch.Tensor, T: int, check_values: bool) -> torch.Tensor:
        """node_depths as a (T,) integer tensor on the tokens' device; with check_values (a host sync)
        every depth in [0, T) (a negative one would index the rotary table from its end), which with
        cache_seqlens <= cache_len - T keeps every node's position inside the cache."""
        if not isinstance(node_depths, torch.Tensor) or node_depths.is_floating_point() or node_depths.is_complex() \
                or node_depths.dtype == torch.bool or node_depths.shape != (T,):
            got = f"{node_depths.dtype} {tuple(node_depths.shape)}" if isinstance(node_depths, torch.Tensor) \
                else type(node_depths).__name__
            raise ValueError(f"node_depths must be a ({T},) integer tensor (each tree node's depth), got {got}")
        node_depths = node_depths.to(cache_seqlens.device)
        if check_values and T and (int(node_depths.min()) < 0 or int(node_depths.max()) >= T):
            raise ValueError(f"node_depths {node_depths.tolist()} must be in [0, {T}): a node's depth below the "
                             "last accepted token")
        return node_depths

    def _checked_heads(self, n_heads: Optional[int]) -> int:
        """n_heads (None: all) as an int in [1, n_future_tokens]."""
        if n_heads is None:
            return self.n_future_tokens
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or not 1 <= n_heads <= self.n_future_tokens:
            raise ValueError(f"n_heads must be an int in [1, n_future_tokens = {self.n_future_tokens}], got {n_heads!r}")
        return n_heads

    def check_uncached_length(self, length: int, what: str) -> None:
        """ValueError naming `what` when a forward without caches over `length` positions would run
        past the release's rotary table, 2 * max_seq_len positions (a Generator's longer cache grows
        the table, which must not move this limit)."""
        limit = 2 * self.params.max_seq_len
        if length > limit:
            raise ValueError(f"{what} exceed the rotary table ({limit} positions: 2 x max_seq_len)")

    def _check_tokens(self, tokens: torch.Tensor, from_start: bool) -> None:
        """Integer (batch, seq) tokens of the vocabulary, at least one per row; from_start (a forward
        without caches, from position 0): within the release's rotary table (check_uncached_length)."""
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(f"tokens must be a (batch, seq) integer tensor, got a {type(tokens).__name__}")
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be a (batch, seq) integer tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[0] == 0:
            raise ValueError(f"tokens {tuple(tokens.shape)} has no rows: give at least one sequence")
        if tokens.shape[1] == 0:
            raise ValueError(f"tokens {tuple(tokens.shape)} has no positions: give at least one token per row")
        if from_start:
            self.check_uncached_length(tokens.shape[1], f"positions up to {tokens.shape[1]}")
        # The range check reads the ids on the host: a compiled forward would break its graph there
        # (three times) and fullgraph=True would fail, so compiled code skips it (the embedding's own
        # lookup still fails on an id past the table); meta tensors have no ids to read.
        if tokens.numel() and not tokens.is_meta and not torch.compiler.is_compiling() and (
                int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

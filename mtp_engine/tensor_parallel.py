"""Tensor-parallel inference in Meta's model-parallel layout, N ranks launched by torchrun.

    torchrun --nproc_per_node 2 -m mtp_engine.tensor_parallel --ckpt-dir 7B_1T_4 --prompt "def fib(n):"

`load_tensor_parallel(ckpt_dir, env)` returns on every rank an ordinary `Transformer` whose every
trunk and head block holds only its rank's part of the attention and feed-forward weights, the
split Meta's release uses (fairscale):

    wq, wk, wv: rows of this rank's heads (dim 0)      wo: the matching columns (dim 1)
    w1, w3:     rows of this rank's FFN slice (dim 0)   w2: the matching columns (dim 1)

Each block computes its heads' attention and its FFN slice; `wo` and `w2` produce partial sums that
one all-reduce each completes (a forward hook on those two Linear modules). Norms are replicated;
`tok_embeddings` and `output` are kept FULL on every rank (all-gathered at load: the shards split
them on dim 1 and dim 0), so every rank computes the same logits and `Generator` (plain and
self-speculative decoding, KV-cache compaction) runs unchanged and yields the same tokens on every rank.

Shards: with world_size == number of consolidated.NN.pth files, rank r reads (memory-maps) only
consolidated.{r:02d}.pth. More generally a rank reads k consecutive shards when there are k x
world_size of them, and a slice of one shard when world_size is a multiple of the shard count
(a single-shard checkpoint: every rank slices its part of the one file).

Inference only: the parameters do not require gradients (the all-reduce hook has no backward).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import (_check_head_count, _check_key_sets, _load_shard, check_weight_dtypes, find_shards,
                         params_vocab_size, read_params, shard_dim)
from .distributed import DistEnv
from .model import Linear, ModelArgs, Transformer, precompute_freqs_cis

# Full on every rank although Meta's shards split them: gathered once at load.
_GATHERED_KEYS = ("tok_embeddings.weight", "output.weight")


def _all_reduce_output(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on a row-parallel Linear (wo, w2): the partial products of all ranks summed."""
    dist.all_reduce(output, op=dist.ReduceOp.SUM)
    return output


def check_tensor_parallel_args(args: ModelArgs, world_size: int) -> None:
    """ValueError unless heads, KV heads and the FFN hidden size split evenly over `world_size` ranks."""
    problems = []
    if args.n_heads % world_size:
        problems.append(f"n_heads {args.n_heads}")
    if args.kv_heads % world_size:
        problems.append(f"n_kv_heads {args.kv_heads}")
    if args.ffn_hidden_dim % world_size:
        problems.append(f"FFN hidden size {args.ffn_hidden_dim}")
    if problems:
        raise ValueError(f"tensor parallelism over {world_size} ranks needs " + " and ".join(problems)
                         + f" divisible by {world_size}")


def _shard_plan(n_shards: int, world_size: int, rank: int, paths: List[Path]):
    """Which files this rank reads and how it cuts them: (files, piece index, pieces per file)."""
    if n_shards % world_size == 0:
        per_rank = n_shards // world_size
        return paths[rank * per_rank:(rank + 1) * per_rank], 0, 1
    if world_size % n_shards == 0:
        ranks_per_file = world_size // n_shards
        return [paths[rank // ranks_per_file]], rank % ranks_per_file, ranks_per_file
    raise ValueError(f"{n_shards} checkpoint shard(s) cannot be spread over {world_size} ranks: one count must "
                     "divide the other (Meta's 7B checkpoints have 1 shard: any world size dividing 32 heads works)")


def _local_tensor(key: str, parts: Sequence[torch.Tensor], piece: int, pieces: int) -> torch.Tensor:
    """This rank's part of `key` from its files' parts: their concatenation, or one piece of one."""
    dim = shard_dim(key)
    if dim is None:
        return parts[0]
    tensor = parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=dim)
    if pieces > 1:
        if tensor.shape[dim] % pieces:
            raise ValueError(f"{key}: dim {dim} of size {tensor.shape[dim]} cannot be cut into {pieces} pieces")
        tensor = tensor.chunk(pieces, dim=dim)[piece]
    return tensor


def _to(tensor: torch.Tensor, device: torch.device, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Move/cast; a contiguous memory-mapped CPU tensor with no cast stays mapped (no copy), a
    column slice (wo, w2) becomes a dense copy of this rank's part."""
    target_dtype = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
    return tensor.to(device=device, dtype=target_dtype).contiguous()


def _gather_full(key: str, local: torch.Tensor, env: DistEnv, ranks_per_file: int) -> torch.Tensor:
    """Rebuild a weight that the shards split from each rank's part (ranks reading the same file hold
    the same part: keep one of each)."""
    parts = [torch.empty_like(local) for _ in range(env.world_size)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts[::ranks_per_file], dim=shard_dim(key))


def _shard_block_modules(model: Transformer, args: ModelArgs, world_size: int) -> None:
    """On the meta device: replace every block's attention/FFN Linears by this rank's sizes."""
    heads, kv_heads = args.n_heads // world_size, args.kv_heads // world_size
    hidden, dh, dim = args.ffn_hidden_dim // world_size, args.head_dim, args.dim
    for block in model.blocks():
        attn, ffn = block.attention, block.feed_forward
        attn.n_heads, attn.n_kv_heads = heads, kv_heads
        attn.wq = Linear(dim, heads * dh, bias=False)
        attn.wk = Linear(dim, kv_heads * dh, bias=False)
        attn.wv = Linear(dim, kv_heads * dh, bias=False)
        attn.wo = Linear(heads * dh, dim, bias=False)
        ffn.w1 = Linear(dim, hidden, bias=False)
        ffn.w2 = Linear(hidden, dim, bias=False)
        ffn.w3 = Linear(dim, hidden, bias=False)


def load_tensor_parallel(ckpt_dir, env: DistEnv, dtype: Optional[torch.dtype] = None,
                         max_seq_len: Optional[int] = None, max_batch_size: Optional[int] = None) -> Transformer:
    """This rank's tensor-parallel `Transformer` from a Meta-layout checkpoint (see the module docstring).

    Every rank of env's default process group must call it (collective: the embedding and output
    shards are all-gathered). env.world_size == 1 loads the plain model. dtype: cast floating weights
    (None keeps the checkpoint's). Raises ValueError when heads, KV heads or the FFN size do not
    split over the ranks, or the shard count and world size do not divide one another.
    """
    ckpt_dir, params_path, params = read_params(ckpt_dir, dtype, max_seq_len, max_batch_size)
    paths = find_shards(ckpt_dir)
    files, piece, pieces = _shard_plan(len(paths), env.world_size, env.rank, paths)
    shards = [_load_shard(p) for p in files]  # memory-mapped: only this rank's files
    if params_vocab_size(params, params_path) is None:
        # Meta writes -1; tok_embeddings (split on dim 1) has every vocabulary row in every shard.
        if "tok_embeddings.weight" not in shards[0]:
            raise ValueError(f"{params_path}: vocab_size is not set and {files[0].name} has no tok_embeddings.weight")
        params["vocab_size"] = int(shards[0]["tok_embeddings.weight"].shape[0])
    args = ModelArgs.from_dict(params, source=str(params_path))
    check_tensor_parallel_args(args, env.world_size)

    with torch.device("meta"):
        model = Transformer(args)
        if env.world_size > 1:
            _shard_block_modules(model, args, env.world_size)
    _check_head_count(args, shards[0], params_path, files[0])
    _check_key_sets({k: None for k in model.state_dict()}, shards[0], files)

    state: Dict[str, torch.Tensor] = {}
    for key, expected in model.state_dict().items():
        parts = [s[key] for s in shards]
        if key in _GATHERED_KEYS:
            # This rank's files together hold a slice (or all) of it; every rank needs all of it.
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=shard_dim(key))
            tensor = _to(tensor, env.device, dtype)
            if env.world_size > 1 and len(paths) > 1:
                tensor = _gather_full(key, tensor, env, ranks_per_file=pieces)
        else:
            tensor = _to(_local_tensor(key, parts, piece, pieces), env.device, dtype)
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(f"{key}: rank {env.rank} expected shape {tuple(expected.shape)} from {params_path.name} "
                             f"and {env.world_size} ranks, got {tuple(tensor.shape)} from {[f.name for f in files]}")
        state[key] = tensor
    del shards
    check_weight_dtypes(state, ckpt_dir)
    model.load_state_dict(state, strict=True, assign=True)
    model.freqs_cis = precompute_freqs_cis(args.head_dim, args.max_seq_len * 2, args.rope_theta).to(env.device)
    model.requires_grad_(False)
    model.eval()
    if env.world_size > 1:
        for block in model.blocks():
            block.attention.wo.register_forward_hook(_all_reduce_output)
            block.feed_forward.w2.register_forward_hook(_all_reduce_output)
        # Every rank must issue its all-reduces in one order: no head blocks on concurrent streams.
        model.concurrent_heads = False
    return model


# ------------------------------------------------------------------------------------ entry point
def main(argv: Optional[List[str]] = None) -> int:
    """`torchrun --nproc_per_node N -m mtp_engine.tensor_parallel --ckpt-dir DIR --prompt TEXT ...`:
    `mtp complete` with the model split over N ranks; rank 0 prints."""
    from .cli import logit_bias_argument, print_completions, repeated_prompts
    from .distributed import cleanup, init_distributed
    from .llama import Llama, resolve_dtype
    from .tokenizer import Tokenizer, find_tokenizer

    parser = argparse.ArgumentParser(prog="python -m mtp_engine.tensor_parallel", description=main.__doc__)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--tokenizer-path", default=None, help="default: tokenizer.model in the checkpoint "
                                                               "directory or its parent")
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--logit-bias", action="append", metavar="ID=BIAS", default=None,
                        help="add BIAS to token ID's logit; repeat for more tokens")
    parser.add_argument("--stop-token-id", action="append", type=int, default=None, metavar="ID",
                        help="end a completion at token ID, as at eos; repeatable")
    parser.add_argument("--max-gen-len", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    parser.add_argument("--seed", type=int, default=0, help="same on every rank, so sampling agrees")
    parser.add_argument("--samples", type=int, default=1, metavar="N",
                        help="completions per prompt (needs --temperature > 0); the prompt is computed once")
    args = parser.parse_args(argv)
    try:
        # The user's mistakes are one line and exit 2, as `mtp complete`'s (from every rank: each checks).
        if not Path(args.ckpt_dir).is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {args.ckpt_dir}")
        for name in ("max_gen_len", "max_seq_len"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        logit_bias = logit_bias_argument(args.logit_bias)
        prompts = repeated_prompts(args.prompt, args.samples, args.temperature)
        env = init_distributed(args.device)
    except (OSError, ValueError, NotImplementedError) as e:
        print(f"{parser.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    try:
        tokenizer_path = find_tokenizer(args.ckpt_dir, args.tokenizer_path)
        torch.manual_seed(args.seed)
        model = load_tensor_parallel(args.ckpt_dir, env, dtype=resolve_dtype(args.dtype, env.device),
                                     max_seq_len=args.max_seq_len, max_batch_size=len(prompts))
        tokenizer = Tokenizer(tokenizer_path)
        tokenizer.check_vocab(model.vocab_size)
        llama = Llama(model, tokenizer, max_seq_len=args.max_seq_len, max_batch_size=len(prompts))
        results = llama.text_completion(prompts, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                        min_p=args.min_p, max_gen_len=args.max_gen_len,
                                        repetition_penalty=args.repetition_penalty,
                                        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                                        logit_bias=logit_bias, stop_token_ids=args.stop_token_id)
        if env.is_main:
            print_completions(args.prompt, results, args.samples)
    except (OSError, ValueError, NotImplementedError) as e:
        rank = f" (rank {env.rank})" if env.world_size > 1 else ""
        print(f"{parser.prog}: error{rank}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        cleanup(env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

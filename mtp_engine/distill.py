"""Self-distillation of the drafting heads: train heads 1..n-1 on the model's own greedy text.

Greedy self-speculative decoding accepts head i's draft when it equals the token the model itself
would produce i steps later. Heads trained on the corpus learn to predict the *data* at t+1+i;
what decoding needs is the *model's greedy continuation*. So (as Medusa-2's self-distillation does
for its draft heads) this continues training-split prompts greedily with the model, then trains only the
extra head blocks on those continuations, with the model's own tokens as targets.

Only `model.extra_heads` (heads 1..n-1) change. The trunk, head 0's block, the shared final norm
and the unembedding stay frozen, so the next-token distribution, greedy output and the held-out
next-token loss are exactly those of the input model: the speed-up is free of quality loss.

    mtp distill --ckpt-dir mtp_engine/default_model --out-dir runs/distilled        # then: mtp eval --ckpt-dir ...

The prompts come from the training split of the corpus (never from held-out files), and the trunk's
output for every sequence is computed once up front (it is frozen), so each step runs only the
extra head blocks and the fused loss.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Union

import torch

from mtp_kernels import fused_linear_cross_entropy

from .checkpoint import load_checkpoint, save_checkpoint
from .data import CorpusSource, _unit_hash, read_text
from .evaluate import (add_source_arguments, past_trained_context, split_against_run, trained_source,
                       training_log)
from .model import Transformer
from .tokenizer import Tokenizer
from .train import check_optimizer_options, shorter_warmup, warmup_cosine_lr


@dataclass
class DistillConfig:
    prompts: int = 1024              # greedy continuations to train on
    prompt_len: int = 64
    gen_len: int = 128
    steps: int = 600
    batch_size: int = 32             # sequences per step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    gen_batch_size: int = 64

    def validate(self) -> None:
        for name in ("prompts", "prompt_len", "gen_len", "steps", "batch_size", "gen_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_optimizer_options(self)
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")


def training_prompts(tokenizer: Tokenizer, n_prompts: int, prompt_len: int, gen_len: int,
                     source: Union[None, Path, CorpusSource] = None) -> List[List[int]]:
    """n_prompts windows of prompt_len tokens from the TRAINING split of `source` (a folder, None for
    the stdlib, or a CorpusSource), at hash-chosen offsets, several per file when the files run out."""
    found = CorpusSource.of(source).split()
    source, train = found.root, found.train
    streams = [s for s in (tokenizer.encode(t, bos=True, eos=True) for t in map(read_text, train) if t)
               if len(s) >= prompt_len + gen_len + 2]
    if not streams:
        raise ValueError(f"no training file under {source} has the {prompt_len + gen_len + 2} tokens a "
                         "prompt and its continuation need")
    prompts = []
    for round_ in range(math.ceil(n_prompts / len(streams))):
        for i, s in enumerate(streams):
            start = int(_unit_hash(f"distill:{round_}:{i}") * (len(s) - prompt_len - gen_len))
            prompts.append(s[start:start + prompt_len])
            if len(prompts) == n_prompts:
                return prompts
    return prompts


@torch.no_grad()
def greedy_sequences(model: Transformer, prompts: List[List[int]], gen_len: int, batch_size: int) -> torch.Tensor:
    """(P, prompt_len + gen_len) int64: every prompt (all of one length) followed by the model's
    greedy continuation of gen_len tokens (no eos stop)."""
    from .generate import Generator

    prompt_len = len(prompts[0])
    if any(len(p) != prompt_len for p in prompts):
        raise ValueError(f"greedy_sequences needs prompts of one length, got lengths {sorted({len(p) for p in prompts})}")
    gen = Generator(model, tokenizer=None, max_batch_size=min(batch_size, len(prompts)),
                    max_seq_len=prompt_len + gen_len + 1)
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        out = gen.generate(chunk, max_gen_len=gen_len, temperature=0.0, eos_id=-1)
        rows += [p + t for p, t in zip(chunk, out.tokens)]
    model.clear_caches()
    return torch.tensor(rows, dtype=torch.int64)


def head_targets(sequences: torch.Tensor, n_extra: int, prompt_len: int, ignore_index: int = -100) -> torch.Tensor:
    """(n_extra, P, L) targets: head i (1-based) at position t predicts sequences[:, t + 1 + i],
    kept only where that token is part of the greedy continuation (index >= prompt_len)."""
    P, L = sequences.shape
    targets = torch.full((n_extra, P, L), ignore_index, dtype=torch.int64)
    for i in range(1, n_extra + 1):
        lo = max(prompt_len - 1 - i, 0)          # first t with t + 1 + i >= prompt_len
        if lo < L - 1 - i:
            targets[i - 1, :, lo:L - 1 - i] = sequences[:, lo + 1 + i:]
    return targets


def distill_heads(model: Transformer, sequences: torch.Tensor, prompt_len: int, cfg: DistillConfig,
                  log=print) -> dict:
    """Train model.extra_heads in place on `sequences`; everything else stays frozen. Returns a log."""
    cfg.validate()
    n_extra = model.n_future_tokens - 1
    if n_extra < 1:
        raise ValueError("self-distillation trains the extra heads; this model has only head 0")
    device = model.output.weight.device
    P, L = sequences.shape
    run_log = {"config": asdict(cfg), "sequences": P, "steps": []}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        params = list(model.extra_heads.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        freqs = model._rope(device)[:L]
        with torch.no_grad():                     # the trunk is frozen: its output once per sequence
            trunk_out = torch.cat([model.trunk_hidden(sequences[s:s + 64].to(device)) for s in range(0, P, 64)])
        targets = head_targets(sequences, n_extra, prompt_len).to(device)
        start = time.perf_counter()
        model.train()
        _distill_loop(model, params, optimizer, trunk_out, targets, freqs, cfg, run_log, start, log)
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
    run_log["train_time_s"] = time.perf_counter() - start
    return run_log


def _distill_loop(model, params, optimizer, trunk_out, targets, freqs, cfg, run_log, start, log) -> None:
    n_extra, P = targets.shape[0], trunk_out.shape[0]
    device, weight = trunk_out.device, model.output.weight
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(P, generator=g)
    for step in range(cfg.steps):
        lr = warmup_cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        first = (step * cfg.batch_size) % P
        idx = order[first:first + cfg.batch_size]
        if idx.numel() < cfg.batch_size:            # wrap around: a new shuffle each epoch
            order = torch.randperm(P, generator=g)
            idx = torch.cat([idx, order[:cfg.batch_size - idx.numel()]])
        idx = idx.to(device)
        hidden = model.norm(torch.stack([head(trunk_out[idx], freqs, None) for head in model.extra_heads]))
        loss, per_head = fused_linear_cross_entropy(hidden.reshape(n_extra, -1, hidden.shape[-1]), weight,
                                                    targets[:, idx].reshape(n_extra, -1),
                                                    return_per_head=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == cfg.steps - 1:
            entry = {"step": step + 1, "loss": float(loss.detach()), "per_head": per_head.tolist(), "lr": lr,
                     "grad_norm": float(grad_norm), "elapsed_s": time.perf_counter() - start}
            run_log["steps"].append(entry)
            log(f"distill step {step + 1}/{cfg.steps}: loss per extra head "
                + " ".join(f"{x:.3f}" for x in entry["per_head"]) + f", lr {lr:.2e}")


# ---------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt-dir", default=None, help="MTP checkpoint (default: the embedded mtp_engine/default_model)")
    parser.add_argument("--tokenizer-path", default=None,
                        help="tokenizer.model (default: in --ckpt-dir or its parent, as Meta ships it)")
    parser.add_argument("--out-dir", required=True, help="where the distilled checkpoint is written")
    add_source_arguments(parser, "training")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    for name, value in asdict(DistillConfig()).items():
        if name == "warmup_steps":   # None: the default share of --steps (see run)
            parser.add_argument("--warmup-steps", type=int, default=None,
                                help=f"DistillConfig.warmup_steps (default {value} for {DistillConfig.steps} steps, "
                                     "the same share of fewer)")
            continue
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                            help=f"DistillConfig.{name} (default {value})")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import check_save_target, default_checkpoint, find_shards, refuse_overwrite, resolve_device
    from .tokenizer import find_tokenizer

    ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else default_checkpoint()
    given = {k: getattr(args, k) for k in asdict(DistillConfig()) if getattr(args, k) is not None}
    if "warmup_steps" not in given:
        given["warmup_steps"] = shorter_warmup(DistillConfig.warmup_steps, DistillConfig.steps, given.get("steps"))
    cfg = DistillConfig(**given)
    cfg.validate()
    device = resolve_device(args.device)
    tokenizer_path = find_tokenizer(ckpt_dir, args.tokenizer_path)
    tokenizer = Tokenizer(tokenizer_path)
    model = load_checkpoint(ckpt_dir, device=device, dtype=torch.float32)
    tokenizer.check_vocab(model.vocab_size)
    # Before minutes of generation and training, not after: what the work needs and where it goes.
    if model.n_future_tokens < 2:
        raise ValueError("self-distillation trains the extra heads; this model has only head 0")
    shards = len(find_shards(ckpt_dir))   # the distilled copy keeps the checkpoint's layout
    out = Path(args.out_dir)
    check_save_target(out, shards)
    # Into the source's own folder (or another model's) the old tree.json, resume/ copy or run state
    # would describe the old heads, and a later `mtp train --resume` would load the undistilled ones.
    refuse_overwrite(out, "mtp distill", "distill into a new folder")
    source = trained_source(ckpt_dir, args.source, args.extensions, args.heldout_fraction)
    crossed = split_against_run(source, ckpt_dir, "train")
    if crossed:
        print(f"distill: warning: {crossed}: the heads would learn the held-out text `mtp eval` scores them on",
              file=sys.stderr)
    warning = past_trained_context(ckpt_dir, cfg.prompt_len, cfg.gen_len)
    if warning:
        print(f"distill: warning: {warning}; the heads learn continuations it never saw there "
              "(--prompt-len / --gen-len)", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    prompts = training_prompts(tokenizer, cfg.prompts, cfg.prompt_len, cfg.gen_len, source)
    t0 = time.perf_counter()
    model.eval()
    sequences = greedy_sequences(model, prompts, cfg.gen_len, cfg.gen_batch_size)
    print(f"distill: {len(prompts)} greedy continuations of {cfg.gen_len} tokens in {time.perf_counter() - t0:.0f} s")
    run_log = distill_heads(model, sequences, cfg.prompt_len, cfg)
    run_log["source_checkpoint"] = str(ckpt_dir)
    run_log["generation_time_s"] = time.perf_counter() - t0 - run_log["train_time_s"]
    save_checkpoint(model, out, shards=shards, dtype=load_dtype(ckpt_dir))
    (out / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    # The trunk's training record travels with it: `mtp eval` reads the trained context from it.
    train_log = training_log(ckpt_dir)   # a run's resume/ copy has it in the run's folder
    if train_log.is_file() and train_log.resolve() != (out / "train_log.json").resolve():
        (out / "train_log.json").write_bytes(train_log.read_bytes())
    (out / "distill_log.json").write_text(json.dumps(run_log, indent=1) + "\n")
    print(f"distill: wrote {out} (extra heads trained {run_log['train_time_s']:.0f} s; the trunk and head 0 "
          "are unchanged)")
    return 0


def load_dtype(ckpt_dir: Path) -> torch.dtype:
    """The floating dtype the checkpoint's tensors are stored in (the distilled copy keeps it)."""
    from .checkpoint import find_shards

    shard = torch.load(find_shards(ckpt_dir)[0], map_location="cpu", weights_only=True, mmap=True)
    return next(t.dtype for t in shard.values() if t.is_floating_point())

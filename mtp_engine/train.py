"""Training an MTP model: `mtp train` and `train(TrainConfig)`.

AdamW with linear warmup and cosine decay, gradient clipping and accumulation, bf16 autocast on
CUDA (float32 on CPU), the fused n-head loss (no logits), periodic held-out evaluation (per-head
loss and top-1 accuracy), Meta-format checkpoints with the optimizer state beside them (resumable:
a resumed run takes exactly the step an uninterrupted one would), a progress line with tokens/s
and ETA, and a JSON log of the run.

Two ways to run the heads (`head_schedule`):
  - "batched": trunk, then all n heads, one loss, one backward (the usual);
  - "sequential": the paper's memory-efficient order. The trunk runs forward once; each head in
    turn runs forward and backward, its gradient accumulating at the (detached) trunk output;
    then the trunk runs backward once. Only one head's activations are alive at a time, and the
    gradients equal the batched schedule's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import nn

from mtp_kernels import fused_linear_cross_entropy

from .checkpoint import (checkpoint_files, load_checkpoint, read_json_object, refuse_overwrite, replace_together,
                         resolve_device)
from .data import DEFAULT_EXTENSIONS, PackedTokens, check_extensions, check_heldout_fraction, prepare_corpus
from .loss import MTPLoss, MTPLossOutput, mtp_targets
from .model import ModelArgs, Transformer

HEAD_SCHEDULES = ("batched", "sequential")


# ---------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    # model
    dim: int = 384
    n_layers: int = 7               # trunk + head blocks, as in params.json
    n_heads: int = 6
    n_kv_heads: Optional[int] = None
    n_future_tokens: int = 4
    multiple_of: int = 64
    seq_len: int = 1024
    # data
    corpus_dir: str = "data/stdlib"  # token cache (tokenizer, train.bin, heldout.bin)
    source: Optional[str] = None     # folder of source files; None: the Python standard library
    extensions: Tuple[str, ...] = DEFAULT_EXTENSIONS   # the endings of its files that are read
    heldout_fraction: float = 0.05   # held-out share of a source without test/ folders
    vocab_size: int = 8192
    max_train_files: Optional[int] = None
    extra_sources: Tuple[str, ...] = ()   # more folders, all for training (e.g. site-packages)
    extra_max_mb: Optional[float] = None  # cap on the extra sources' text
    tokenizer: Optional[str] = None  # an existing tokenizer.model to use instead of training one
    # optimization
    batch_size: int = 32             # sequences per micro-batch
    grad_accum: int = 1
    max_steps: int = 2000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    head_schedule: str = "batched"
    head_weights: Optional[List[float]] = None
    # torch.compile backend for the training step (forward, loss, backward; fullgraph): "inductor",
    # or "aot_eager" (no C++ compiler needed); None (or "none"): eager. Under FSDP or the sequential
    # head schedule each block is compiled instead of the step.
    compile: Optional[str] = None
    # Recompute each block's forward in the backward instead of keeping its activations
    # (Transformer.set_activation_checkpointing): less memory for a longer step. May change on resume.
    activation_checkpointing: bool = False
    time_budget_s: Optional[float] = None   # stop (and save) after this much training time
    # With time_budget_s, a fresh run times its first steps and sets max_steps so that the cosine
    # schedule ends when the budget does (a GPU lease of unknown speed); the log records the value,
    # trainer_state.json keeps it, and a resumed run uses it whatever max_steps its cfg says.
    schedule_to_budget: bool = False
    # bookkeeping
    out_dir: str = "runs/default"
    eval_every: int = 200
    eval_windows: int = 64
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    device: Optional[str] = None     # None: cuda when available
    distributed: str = "none"        # "none" | "ddp" | "fsdp" (under torchrun)
    export_dtype: str = "bfloat16"   # dtype of the final Meta-format checkpoint
    progress: bool = True

    def __post_init__(self):
        if self.compile == "none":   # `--compile none`: eager (a resumed run's way back from a backend)
            self.compile = None

    def model_args(self, vocab_size: int) -> ModelArgs:
        return ModelArgs(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                         n_future_tokens=self.n_future_tokens, vocab_size=vocab_size, multiple_of=self.multiple_of,
                         max_seq_len=self.seq_len, max_batch_size=1)

    def validate(self) -> None:
        # The model's shape first: before minutes of corpus preparation, not after.
        self.model_args(self.vocab_size).validate("TrainConfig")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"seq_len must be an int >= 2 (a window needs an input and a target), got {self.seq_len!r}")
        if self.seq_len <= self.n_future_tokens:
            raise ValueError(f"seq_len {self.seq_len} leaves head {self.n_future_tokens - 1} (token t+"
                             f"{self.n_future_tokens}) no target in a window: it must be at least "
                             f"n_future_tokens + 1 = {self.n_future_tokens + 1}")
        if self.head_schedule not in HEAD_SCHEDULES:
            raise ValueError(f"head_schedule must be one of {HEAD_SCHEDULES}, got {self.head_schedule!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_windows", "eval_every", "save_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        check_optimizer_options(self)
        check_extensions(self.extensions)
        check_heldout_fraction(self.heldout_fraction)
        for name in ("time_budget_s", "extra_max_mb"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be None or a finite number >= 0, got {value!r}")
        if self.max_train_files is not None and (isinstance(self.max_train_files, bool)
                                                 or not isinstance(self.max_train_files, int)
                                                 or self.max_train_files < 1):
            raise ValueError(f"max_train_files must be None or a positive int, got {self.max_train_files!r}")
        if self.head_weights is not None and not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
                for w in self.head_weights):
            raise ValueError(f"head_weights must be finite numbers >= 0, got {self.head_weights}")
        if self.head_weights is not None and len(self.head_weights) != self.n_future_tokens:
            raise ValueError(f"head_weights has {len(self.head_weights)} entries for {self.n_future_tokens} heads")
        if self.distributed not in ("none", "ddp", "fsdp"):
            raise ValueError(f"distributed must be none, ddp or fsdp, got {self.distributed!r}")
        if self.head_schedule == "sequential" and self.distributed == "fsdp":
            raise ValueError("head_schedule 'sequential' runs the blocks outside FSDP's forward hooks; "
                             "use it with distributed 'none' or 'ddp'")
        if self.compile is not None:
            check_compile_backend(self.compile)
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(f"activation_checkpointing must be True or False, got {self.activation_checkpointing!r}")
        if self.schedule_to_budget and (self.time_budget_s is None or self.distributed != "none"):
            raise ValueError("schedule_to_budget needs time_budget_s and a single process (distributed 'none')")
        if self.export_dtype not in _EXPORT_DTYPES:
            raise ValueError(f"export_dtype must be one of {sorted(_EXPORT_DTYPES)}, got {self.export_dtype!r}")
        if self.device is not None:
            resolve_device(self.device)


_EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_compile_backend(name) -> None:
    """ValueError unless `name` is a torch.compile backend for training: Dynamo's listed ones (not its
    debugging and test-only ones) and aot_eager. Imports Dynamo: only when one is asked for."""
    import torch._dynamo

    backends = sorted({*torch._dynamo.list_backends(), "aot_eager"})
    if not isinstance(name, str) or name not in backends:
        raise ValueError(f"compile must be none (eager) or a torch.compile backend ({', '.join(backends)}), "
                         f"got {name!r}")


def _compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# Named starting points; any field can be overridden on the command line.
PRESETS = {
    # seconds on a laptop: tests and smoke runs
    "tiny": dict(dim=32, n_layers=5, n_heads=4, n_kv_heads=2, multiple_of=16, seq_len=64, vocab_size=512,
                 batch_size=4, max_steps=20, warmup_steps=2, lr=3e-3, eval_every=10, eval_windows=4,
                 save_every=10, max_train_files=20),
    # What a 2-core CPU trains in 30-45 minutes (5.8M parameters, ~1.5M tokens at ~600 tokens/s per
    # core): the size at which that budget still sees about half the 3M-token stdlib corpus.
    "cpu": dict(dim=192, n_layers=6, n_heads=4, multiple_of=64, seq_len=512, vocab_size=8192,
                batch_size=4, max_steps=700, warmup_steps=40, lr=3e-3, eval_every=100, eval_windows=32,
                save_every=100),
    # One GPU, about 8 minutes: 18.7M parameters (3 trunk + 4 head blocks, head_dim 64 for the
    # Triton attention), 35.6 MiB in bf16 so that the model, tokenizer and logs stay under 40 MB.
    "default": dict(dim=384, n_layers=7, n_heads=6, multiple_of=64, seq_len=1024, vocab_size=8192,
                    batch_size=32, max_steps=2000, warmup_steps=100, lr=3e-3, eval_every=250, eval_windows=64,
                    save_every=500),
}


def preset_config(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown TrainConfig fields: {unknown}")
    return TrainConfig(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------- the loss module
class MTPTrainModel(nn.Module):
    """The model plus its n-head loss, as one module: forward(tokens (B, T)) -> MTPLossOutput.

    The unembedding weight is read inside forward, so wrappers that gather parameters around
    forward (FSDP) hand the fused loss the real, full `output.weight`.
    """

    def __init__(self, model: Transformer, head_weights: Optional[List[float]] = None, ignore_index: int = -100):
        super().__init__()
        self.model = model
        self.n_future = model.n_future_tokens
        self.ignore_index = ignore_index
        self.head_weights = [1.0] * self.n_future if head_weights is None else [float(w) for w in head_weights]
        self.loss_fn = MTPLoss(self.n_future, ignore_index=ignore_index, head_weights=self.head_weights)

    def forward(self, tokens: torch.Tensor) -> MTPLossOutput:
        return self.loss_fn(self.model.head_hidden(tokens), self.model.output.weight, tokens)

    def forward_backward_sequential(self, tokens: torch.Tensor, loss_scale: float = 1.0) -> MTPLossOutput:
        """The memory-efficient schedule: backward of `loss_scale * loss` done here, head by head.

        Returns the same MTPLossOutput as forward (loss detached: the backward has happened).
        """
        model = self.model
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a (batch, seq) tensor, got {shape}")
        B, T = tokens.shape
        trunk_out = model.trunk_hidden(tokens)
        trunk_in = trunk_out.detach().requires_grad_(True)
        targets = mtp_targets(tokens, self.n_future, self.ignore_index).view(self.n_future, B * T)
        per_head = []
        for i in range(self.n_future):
            hidden = model.head_hidden_from_trunk(trunk_in, i)            # (B, T, D)
            loss_i = fused_linear_cross_entropy(hidden.reshape(1, B * T, -1), model.output.weight, targets[i:i + 1],
                                                ignore_index=self.ignore_index)
            (loss_i * (self.head_weights[i] * loss_scale)).backward()     # frees this head's activations
            per_head.append(loss_i.detach().float())                      # stays on the device: no sync per head
        trunk_out.backward(trunk_in.grad)
        # Python-float weights: no host-to-device copy (a blocking one) per step.
        total = sum(w * loss_i for w, loss_i in zip(self.head_weights, per_head))
        return MTPLossOutput(total, torch.stack(per_head))


# ---------------------------------------------------------------------- helpers
def init_weights(model: Transformer, std: float = 0.02) -> None:
    """GPT-2-style init: N(0, std) everywhere, residual projections (wo, w2) scaled by 1/sqrt(2 L)."""
    residual_std = std / math.sqrt(2 * model.n_layers)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            nn.init.normal_(p, mean=0.0, std=residual_std if name.endswith(("wo.weight", "w2.weight")) else std)


def check_optimizer_options(cfg) -> None:
    """ValueError unless cfg's lr, min_lr_ratio, weight_decay, grad_clip (and beta1, beta2 where it
    has them) are finite and in range: a TrainConfig or a DistillConfig."""
    names = [n for n in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip") if hasattr(cfg, n)]
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if cfg.lr <= 0 or not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"need lr > 0 and min_lr_ratio in [0, 1], got {cfg.lr}, {cfg.min_lr_ratio}")
    if cfg.weight_decay < 0:
        raise ValueError(f"need weight_decay >= 0, got {cfg.weight_decay}")
    if not all(0 <= getattr(cfg, n) < 1 for n in ("beta1", "beta2") if n in names):
        raise ValueError(f"need betas in [0, 1), got ({cfg.beta1}, {cfg.beta2})")
    if cfg.grad_clip <= 0:   # a negative clip norm reverses every update; 0 stops training
        raise ValueError(f"grad_clip must be > 0 (the gradient norm to clip to), got {cfg.grad_clip}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr down to min_lr_ratio * lr at max_steps."""
    return warmup_cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)


def warmup_cosine_lr(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# The schedule fit times steps 5 to 25 of a run (the first ones compile kernels); on a machine too
# slow for that, it fits as soon as 2 steps are timed and a fifth of the budget has gone (a budget
# spent before step 25 left the cosine unfitted: it never decayed).
_FIT_FROM_STEP, _FIT_AT_STEP, _FIT_BY_SHARE = 5, 25, 0.2
# Held back from the budget for the evaluations and saves the run makes on its way.
_FIT_RESERVE = 0.05


def _fit_schedule(cfg: TrainConfig, step: int, step_time_s: float, elapsed_s: float):
    """cfg with max_steps set so the remaining budget ends the cosine schedule. The warmup is kept:
    at the fit it is under way (or over), and a shorter one would make the learning rate jump. Only
    a budget too short for the warmup itself cuts it, to end on the last step."""
    remaining = cfg.time_budget_s * (1 - _FIT_RESERVE) - elapsed_s
    max_steps = max(step + 1, step + int(remaining / max(step_time_s, 1e-9)))
    warmup = min(cfg.warmup_steps, max_steps)
    return dataclasses.replace(cfg, max_steps=max_steps, warmup_steps=warmup), {
        "step_time_s": step_time_s, "max_steps": max_steps, "at_step": step, "warmup_steps": warmup}


def _refit(cfg: TrainConfig, fitted: dict) -> TrainConfig:
    """A resumed run's cfg with the schedule fitted before the interruption (trainer_state.json)."""
    return dataclasses.replace(cfg, max_steps=fitted["max_steps"], warmup_steps=fitted["warmup_steps"])


# A distributed run with a time budget checks it every this many steps, all ranks together: each rank
# keeps its own clock, and a rank that stopped alone would leave the others in a collective.
_BUDGET_CHECK_EVERY_DIST = 8


def _over_time(cfg: TrainConfig, step: int, elapsed_s: float, env) -> bool:
    """Whether the run stops for its time budget after `step`; every rank gets the same answer."""
    if cfg.time_budget_s is None:
        return False
    over = elapsed_s >= cfg.time_budget_s
    if env is None:
        return over
    if step % _BUDGET_CHECK_EVERY_DIST:
        return False
    from .distributed import any_rank

    return any_rank(over, env)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only (not on norm gains)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=True)


@torch.no_grad()
def evaluate(model: Transformer, windows: torch.Tensor, batch_size: int = 8, autocast=nullcontext,
             ignore_index: int = -100) -> dict:
    """Per-head mean loss and top-1 accuracy on `windows` (W, T): {'loss': [n], 'acc': [n], 'tokens': [n]}."""
    n = model.n_future_tokens
    device = model.output.weight.device
    loss_sum = torch.zeros(n, dtype=torch.float64)
    correct = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for start in range(0, windows.shape[0], batch_size):
        tokens = windows[start:start + batch_size].to(device)
        with autocast():
            hidden = model.head_hidden(tokens)                              # (n, B, T, D)
        targets = mtp_targets(tokens, n, ignore_index)                      # (n, B, T)
        for i in range(n):
            h = hidden[i].reshape(-1, hidden.shape[-1])
            t = targets[i].reshape(-1)
            valid = t != ignore_index
            # One head's logits for a small eval batch: bounded, and needed for top-1 anyway.
            logits = (h[valid] @ model.output.weight.t().to(h.dtype)).float()
            tv = t[valid]
            loss_sum[i] += torch.nn.functional.cross_entropy(logits, tv, reduction="sum").double().cpu()
            correct[i] += (logits.argmax(-1) == tv).sum().double().cpu()
            count[i] += valid.sum().double().cpu()
    model.train(was_training)
    denom = count.clamp(min=1)
    return {"loss": (loss_sum / denom).tolist(), "acc": (correct / denom).tolist(), "tokens": count.long().tolist()}


class Progress:
    """One updating stderr line: step, loss, tokens/s, ETA."""

    def __init__(self, total_steps: int, enabled: bool):
        self.total = total_steps
        self.enabled = enabled and sys.stderr is not None

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, eta_s: float) -> None:
        if not self.enabled:
            return
        width = 24
        done = int(width * step / self.total)
        bar = "#" * done + "." * (width - done)
        sys.stderr.write(f"\r[{bar}] step {step}/{self.total} loss {loss:.3f} lr {lr:.2e} "
                         f"{tokens_per_s:,.0f} tok/s ETA {_fmt_time(eta_s)}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _nothing_to_train(out: Path, state: dict, cfg: TrainConfig) -> Optional[str]:
    """Why a resume of the run in `out` (trainer_state.json `state`) would train nothing, or None: its
    final save is made and cfg asks no more steps, or no more time. (It would otherwise rewrite the
    run's summary from a loop that never ran.)"""
    if not state.get("final"):
        return None
    if state["step"] >= cfg.max_steps:
        return (f"nothing to train: the run in {out} is at step {state['step']} and --max-steps is {cfg.max_steps}; "
                "pass a larger --max-steps to train on")
    if cfg.time_budget_s is not None and state["train_time_s"] >= cfg.time_budget_s:
        return (f"nothing to train: the run in {out} has trained {state['train_time_s']:.0f} s of its "
                f"--time-budget-s {cfg.time_budget_s:g} (the budget counts every resume); pass a larger one")
    return None


def _check_resume_step(optimizer_state: dict, step: int, out: Path) -> None:
    """Refuse an optimizer state that has taken another number of steps than trainer_state.json says
    (AdamW counts them per parameter): the files of two saves, which a resume must not mix."""
    taken = {int(s["step"]) for s in optimizer_state.get("state", {}).values() if isinstance(s, dict) and "step" in s}
    if taken and max(taken) != step:
        raise ValueError(f"{out / 'optimizer.pt'} has taken {max(taken)} steps but {out / 'trainer_state.json'} "
                         f"says step {step}: the files come from different saves (one was cut short); restore a "
                         "whole save or start a new run")


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, resume: bool = False, log=print, preset: Optional[str] = None) -> dict:
    """Run (or resume) a training run; returns the run's log dict (also written to out_dir/train_log.json).

    out_dir receives the Meta-format checkpoint (params.json, consolidated.00.pth, tokenizer.model)
    of the latest save, `optimizer.pt` + `trainer_state.json` to resume, and `train_log.json`.
    """
    cfg.validate()
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} is a file; it must be a folder (new or existing)")
    state_path = out / "trainer_state.json"
    saved_state = read_json_object(state_path) if resume and state_path.is_file() else None
    if saved_state is None:   # a new run: never over another model
        refuse_overwrite(out, "mtp train", "pass --resume to continue its run" if state_path.is_file()
                         else "it has no trainer_state.json, so it is no run --resume continues")
    env = _init_distributed(cfg)
    is_main = env is None or env.is_main
    device = env.device if env is not None else torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log = log if is_main else _quiet
    if env is None and cfg.distributed != "none":
        log(f"distributed {cfg.distributed}: one process (not launched by torchrun with several), so one device")
    if saved_state is not None:
        done = _nothing_to_train(out, saved_state, cfg)
        if done is not None:
            log(done)
            if env is not None:
                _cleanup(env)
            return read_json_object(out / "train_log.json")

    log_path = out / "train_log.json"
    previous = read_json_object(log_path) if resume and log_path.is_file() else None
    corpus = _load_corpus(cfg, out, saved_state, previous, env, log)
    train_data = PackedTokens(corpus.train_path, cfg.seq_len)
    heldout = PackedTokens(corpus.heldout_path, cfg.seq_len).fixed_windows(cfg.eval_windows)

    torch.manual_seed(cfg.seed)
    model, state = _load_or_build_model(cfg, out, saved_state, resume, corpus, device, log)
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    module = MTPTrainModel(model, cfg.head_weights)
    # FSDP gathers each block's shards in hooks around the block, and the sequential schedule runs a
    # backward per head inside its step: there each block is compiled on its own (before the sharding,
    # as FSDP2 asks), and the loss and what lies between the blocks run eagerly.
    compile_blocks = cfg.compile and (cfg.distributed == "fsdp" or cfg.head_schedule == "sequential")
    graphs_before = _compiled_graphs() if cfg.compile else 0
    if compile_blocks:
        for block in model.blocks():
            block.compile(backend=cfg.compile, fullgraph=True)
    wrapped = _wrap(module, cfg, env)
    # Otherwise the training step is compiled whole (the kernels are custom ops the compiler calls as
    # they are); the module itself stays eager for evaluation and saving. DDP's own forward has a step
    # Dynamo cannot trace, so under DDP the graph breaks there (fullgraph would refuse it).
    train_step = (torch.compile(wrapped, backend=cfg.compile, fullgraph=cfg.distributed == "none")
                  if cfg.compile and not compile_blocks else wrapped)
    optimizer = make_optimizer(module, cfg)
    if resume and state["step"] > 0:
        _load_optimizer_state(out, state["step"], wrapped, optimizer, cfg, env, device)
    run_log = _start_run_log(cfg, model, corpus, device, state, previous, preset)
    if is_main:   # made only now: a run that fails on its data or tokenizer leaves no empty folder
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(corpus.tokenizer.model_path, out / "tokenizer.model")
    log(f"model: {model.num_params():,} parameters ({model.params.n_trunk_layers} trunk layers + "
        f"{model.n_future_tokens} heads, dim {cfg.dim}), vocabulary {model.vocab_size}; "
        f"{len(train_data):,} training windows of {cfg.seq_len}; device {run_log['device']}")
    if cfg.compile:
        log(f"{'each block' if compile_blocks else 'the training step'} compiled with torch.compile (backend "
            f"{cfg.compile}): the first step includes the compile")
    if cfg.activation_checkpointing:
        log("activation checkpointing: each block's forward runs again in the backward")

    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext)
    world = env.world_size if env is not None else 1
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * world
    progress = Progress(cfg.max_steps, cfg.progress and is_main)
    if compile_blocks and cfg.schedule_to_budget:
        # The blocks' no-grad variants would compile at the first evaluation, inside the steps the
        # schedule is fitted on: compile them now (one evaluation, its result unused).
        with _gathered(wrapped, cfg, env):
            evaluate(model, heldout, autocast=autocast)
    module.train()
    step = state["step"]
    start_time = time.perf_counter() - state["train_time_s"]
    window_start, window_tokens = time.perf_counter(), 0
    # Windows of the global order read so far (PackedTokens.windows): a resume on another number of
    # ranks continues where the run stopped. (Saves from before it was kept: their token count.)
    windows_read = state.get("windows_read", state["tokens"] // cfg.seq_len)
    last_loss = run_log["steps"][-1]["loss"] if run_log["steps"] else float("nan")
    # A resumed run keeps the schedule fitted before the interruption; one interrupted before its fit
    # fits from here (the first steps after a start compile kernels again, so the timing starts later).
    fit_schedule = cfg.schedule_to_budget and "schedule_fit" not in state
    if cfg.schedule_to_budget and not fit_schedule:
        cfg = _refit(cfg, state["schedule_fit"])
        run_log["config"].update(max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps)
        run_log["schedule_fit"] = state["schedule_fit"]
        progress.total = cfg.max_steps
    fit_from, fit_at = step + _FIT_FROM_STEP, step + _FIT_AT_STEP
    try:
        while step < cfg.max_steps:
            if fit_schedule and step >= fit_from:
                _sync(device)   # the host's clock times the device's steps: only in the fitting window
                now = time.perf_counter()
                if step == fit_from:   # the first steps compile kernels: time the ones after
                    fit_start = now
                elif step == fit_at or (step >= fit_from + 2
                                        and now - start_time >= _FIT_BY_SHARE * cfg.time_budget_s):
                    cfg, fitted = _fit_schedule(cfg, step, (now - fit_start) / (step - fit_from), now - start_time)
                    run_log["config"].update(max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps)
                    run_log["schedule_fit"] = state["schedule_fit"] = fitted
                    progress.total = cfg.max_steps
                    log(f"schedule fitted to the time budget: {fitted['step_time_s'] * 1e3:.1f} ms per step, "
                        f"max_steps {fitted['max_steps']}")
                    fit_schedule = False
            lr = lr_at(step, cfg)
            per_head, grad_norm = _optimizer_step(module, wrapped, train_step, optimizer, lr, train_data,
                                                  windows_read, cfg, env, device, autocast)
            windows_read += world * cfg.batch_size * cfg.grad_accum
            step += 1
            window_tokens += tokens_per_step
            state["tokens"] += tokens_per_step
            state["windows_read"] = windows_read
            over_time = _over_time(cfg, step, time.perf_counter() - start_time, env)
            if step % cfg.log_every == 0 or step == cfg.max_steps or over_time:
                # Host reads (and the cross-rank mean) only on logging steps.
                logged = _all_reduce_mean(per_head, env) if env is not None else per_head
                # The objective the optimizer sees: the head-weighted sum (per_head stays unweighted).
                last_loss = sum(w * x for w, x in zip(module.head_weights, logged.tolist()))
                now = time.perf_counter()
                tps = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                elapsed = now - start_time
                eta = elapsed / step * (cfg.max_steps - step)
                run_log["steps"].append({"step": step, "loss": last_loss, "per_head": logged.tolist(), "lr": lr,
                                         "grad_norm": float(grad_norm), "tokens": state["tokens"], "tokens_per_s": tps,
                                         "elapsed_s": elapsed})
                progress.update(step, last_loss, lr, tps, eta)
            if step % cfg.eval_every == 0 or step == cfg.max_steps or over_time:
                with _gathered(wrapped, cfg, env):   # every rank: FSDP gathers collectively
                    result = evaluate(model, heldout, autocast=autocast)
                run_log["evals"].append({"step": step, "tokens": state["tokens"], **result})
                progress.close()
                log(f"eval @ step {step}: loss per head " + " ".join(f"{x:.3f}" for x in result["loss"])
                    + " | top-1 " + " ".join(f"{x:.3f}" for x in result["acc"]))
            if step % cfg.save_every == 0 or step == cfg.max_steps or over_time:
                state["step"], state["train_time_s"] = step, time.perf_counter() - start_time
                _save(out, module, wrapped, optimizer, state, run_log, cfg, env, final=False)
            if over_time:
                log(f"time budget of {cfg.time_budget_s:g} s reached at step {step}")
                break
    finally:
        progress.close()
    state["step"], state["train_time_s"] = step, time.perf_counter() - start_time
    run_log["summary"] = {"steps": step, "tokens": state["tokens"], "train_time_s": state["train_time_s"],
                          "final_loss": None if math.isnan(last_loss) else last_loss,
                          "final_eval": run_log["evals"][-1] if run_log["evals"] else None}
    if cfg.compile:   # what this run compiled: the step in 1 graph; or the blocks' variants (with and without grad)
        run_log["summary"]["compiled_graphs"] = _compiled_graphs() - graphs_before
    _save(out, module, wrapped, optimizer, state, run_log, cfg, env, final=True)
    if env is not None:
        _cleanup(env)
    return run_log


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than the main one."""


def _load_corpus(cfg: TrainConfig, out: Path, saved_state: Optional[dict], previous: Optional[dict], env, log):
    """The run's tokenized corpus (`prepare_corpus`): made by the main rank, the others reading it once
    it is there. A resume keeps the run's tokenizer, and warns when the corpus changed since."""
    options = dict(extensions=cfg.extensions, heldout_fraction=cfg.heldout_fraction,
                   max_train_files=cfg.max_train_files, extra_sources=cfg.extra_sources,
                   extra_max_mb=cfg.extra_max_mb, tokenizer_path=cfg.tokenizer)
    if saved_state is not None and (out / "tokenizer.model").is_file():
        # A changed corpus (files added, another Python's stdlib) would train another tokenizer, and
        # the run's weights would go on over other token ids.
        options["tokenizer_path"] = str(out / "tokenizer.model")
    is_main = env is None or env.is_main
    corpus = prepare_corpus(cfg.corpus_dir, cfg.source, cfg.vocab_size, **options, log=log) if is_main else None
    if env is not None:
        _barrier(env)
        corpus = corpus or prepare_corpus(cfg.corpus_dir, cfg.source, cfg.vocab_size, **options, log=_quiet)
    if saved_state is not None:
        before = (previous or {}).get("corpus", {})
        if before.get("train_tokens") not in (None, corpus.manifest["train_tokens"]):
            log(f"resume: warning: the corpus changed since the run started ({before['train_tokens']:,} training "
                f"tokens then, {corpus.manifest['train_tokens']:,} now): it reads other windows than an "
                "uninterrupted run would")
    return corpus


def _load_or_build_model(cfg: TrainConfig, out: Path, saved_state: Optional[dict], resume: bool, corpus,
                         device: torch.device, log) -> Tuple[Transformer, dict]:
    """(model on `device`, trainer state): the saved float32 weights and state of a resumed run, or a
    freshly initialized model at step 0."""
    if saved_state is not None:
        state = saved_state
        # After a final save, `out` holds the export-dtype release copy and `out/resume` the float32 master.
        source = out / "resume" if state.get("final") and (out / "resume").is_dir() else out
        model = load_checkpoint(source, device="cpu", dtype=torch.float32).to(device)
        log(f"resuming {out} at step {state['step']}")
    else:
        if resume:
            log(f"no trainer_state.json in {out}: starting a new run")
        model = Transformer(cfg.model_args(corpus.tokenizer.n_words))
        init_weights(model)
        model.to(device)
        state = {"step": 0, "tokens": 0, "train_time_s": 0.0}
    # The rotary table is a plain attribute: move it once rather than per call.
    model.freqs_cis = model.freqs_cis.to(device)
    return model, state


def _load_optimizer_state(out: Path, step: int, wrapped: nn.Module, optimizer, cfg: TrainConfig, env,
                          device: torch.device) -> None:
    """The interrupted run's AdamW state (optimizer.pt), into every rank's optimizer."""
    if not (out / "optimizer.pt").is_file():
        # AdamW restarted from empty moments would not take the step the interrupted run would have.
        raise ValueError(f"{out / 'optimizer.pt'} is missing: the run cannot resume at step {step} "
                         "with its optimizer state; restore the file or start a new run")
    is_main = env is None or env.is_main
    saved = torch.load(out / "optimizer.pt", map_location=device, weights_only=True) if is_main else None
    if is_main:
        _check_resume_step(saved, step, out)
    if env is None:
        optimizer.load_state_dict(saved)
    else:
        from .distributed import load_optimizer_state

        load_optimizer_state(wrapped, optimizer, saved, cfg.distributed, env)


def _start_run_log(cfg: TrainConfig, model: Transformer, corpus, device: torch.device, state: dict,
                   previous: Optional[dict], preset: Optional[str]) -> dict:
    """The run's log: its configuration and corpus, and, on a resume, the earlier log's steps and
    evaluations up to the resumed step."""
    run_log = {"config": dataclasses.asdict(cfg), "device": _device_name(device),
               "params": model.num_params(), "corpus": {k: corpus.manifest[k] for k in
                                                        ("source", "train_tokens", "heldout_tokens", "vocab_size")},
               "steps": [], "evals": []}
    if preset is not None:   # the --preset the run was started with (a resume may repeat it, not change it)
        run_log["preset"] = preset
    if previous is not None:
        if "preset" in previous:
            run_log["preset"] = previous["preset"]
        run_log["steps"] = [s for s in previous.get("steps", []) if s["step"] <= state["step"]]
        run_log["evals"] = [e for e in previous.get("evals", []) if e["step"] <= state["step"]]
    return run_log


def _optimizer_step(module: MTPTrainModel, wrapped: nn.Module, train_step, optimizer, lr: float,
                    train_data: PackedTokens, windows_read: int, cfg: TrainConfig, env, device: torch.device,
                    autocast):
    """One optimizer step at learning rate `lr` over grad_accum micro-batches, this rank's windows
    of the global order from `windows_read` on. Returns (per_head, grad_norm): the (n,) unweighted
    per-head losses averaged over the micro-batches and the pre-clip gradient norm, both tensors on
    the device (no host sync)."""
    world = env.world_size if env is not None else 1
    rank = env.rank if env is not None else 0
    for group in optimizer.param_groups:
        group["lr"] = lr
    per_head = torch.zeros(module.model.n_future_tokens, device=device)
    for micro in range(cfg.grad_accum):
        first = windows_read + micro * world * cfg.batch_size + rank * cfg.batch_size
        tokens = train_data.windows(first, cfg.batch_size, cfg.seed).to(device)
        with _no_sync(wrapped, cfg, last=micro == cfg.grad_accum - 1):
            if cfg.head_schedule == "sequential":
                with autocast():
                    result = module.forward_backward_sequential(tokens, 1.0 / cfg.grad_accum)
            else:
                with autocast():
                    result = train_step(tokens)
                (result.loss / cfg.grad_accum).backward()
        per_head += result.per_head.detach().to(device) / cfg.grad_accum
    if cfg.head_schedule == "sequential" and env is not None:
        _sync_grads(module, env)
    grad_norm = _clip(wrapped, module, cfg)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return per_head, grad_norm


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _save(out: Path, module: MTPTrainModel, wrapped: nn.Module, optimizer, state: dict, run_log: dict,
          cfg: TrainConfig, env, final: bool) -> None:
    """Checkpoint: the model in Meta's layout (float32 while training; export_dtype for the final one),
    optimizer state and trainer state beside it, and the log."""
    full = _full_state_dict(wrapped, cfg, env)
    if env is None:
        optimizer_state = optimizer.state_dict()
    else:  # keyed by parameter name, gathered from every rank's shard (collective)
        from .distributed import full_optimizer_state

        optimizer_state = full_optimizer_state(wrapped, optimizer, cfg.distributed, env)
    if env is not None and not env.is_main:
        return
    dtype = _EXPORT_DTYPES[cfg.export_dtype] if final else torch.float32
    # All that a resume reads is replaced together, once every file is written (a full disk or an
    # interrupt leaves the previous save whole); the optimizer state is renamed first and
    # trainer_state.json after the weights it goes with, so that a rename cut short between a periodic
    # save and the next shows at resume (`_check_resume_step`).
    # A final save in another dtype is a release copy in `out` and the float32 master weights in
    # out/resume, which a resume reads once trainer_state.json says final: the release copy is renamed
    # last, so a resume never takes it for the master weights.
    release = final and dtype != torch.float32
    files = [(out / "optimizer.pt", lambda tmp: torch.save(optimizer_state, tmp))]
    files += checkpoint_files(module.model, out / "resume" if release else out, state_dict=full, dtype=torch.float32)
    trainer_state = json.dumps({**state, "final": final}, indent=1) + "\n"
    files.append((out / "trainer_state.json", lambda tmp: tmp.write_text(trainer_state)))
    if release:
        files += checkpoint_files(module.model, out, state_dict=full, dtype=dtype)
    replace_together(files)
    _write_json(out / "train_log.json", run_log)


# ---------------------------------------------------------------------- distributed glue
def _init_distributed(cfg: TrainConfig):
    if cfg.distributed == "none" and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    from .distributed import init_distributed

    env = init_distributed(cfg.device)
    if env.world_size == 1:
        return None
    if cfg.distributed == "none":
        raise ValueError("launched by torchrun with several processes: pass --distributed ddp or fsdp")
    return env


def _wrap(module: MTPTrainModel, cfg: TrainConfig, env) -> nn.Module:
    if env is None:
        return module
    from .distributed import wrap_for_training

    return wrap_for_training(module, cfg.distributed, env)


@contextmanager
def _gathered(wrapped: nn.Module, cfg: TrainConfig, env):
    """no_grad, plus FSDP's all-gather of the root's parameters for direct model calls (evaluation)."""
    with torch.no_grad():
        if env is None:
            yield
            return
        from .distributed import gathered_parameters

        with gathered_parameters(wrapped, cfg.distributed, env):
            yield


def _no_sync(wrapped: nn.Module, cfg: TrainConfig, last: bool):
    # DDP all-reduces on every backward; accumulation steps before the last need none. The
    # sequential schedule runs several backwards per micro-batch and syncs by hand (_sync_grads).
    if cfg.distributed == "ddp" and (cfg.head_schedule == "sequential" or not last) and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    return nullcontext()


def _sync_grads(module: nn.Module, env) -> None:
    import torch.distributed as dist

    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(env.world_size)


def _clip(wrapped: nn.Module, module: nn.Module, cfg: TrainConfig):
    """Clip in place; returns the pre-clip norm as a tensor (read on logging steps only)."""
    params = [p for p in wrapped.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _full_state_dict(wrapped: nn.Module, cfg: TrainConfig, env):
    """The Transformer's full state dict in Meta's names on rank 0 of a distributed run, else None."""
    if env is None:
        return None
    from .distributed import full_state_dict

    return full_state_dict(wrapped, cfg.distributed, env)


def _barrier(env) -> None:
    from .distributed import barrier

    barrier(env)


def _all_reduce_mean(t: torch.Tensor, env) -> torch.Tensor:
    from .distributed import all_reduce_mean

    return all_reduce_mean(t, env)


def _cleanup(env) -> None:
    from .distributed import cleanup

    cleanup(env)


# ---------------------------------------------------------------------- command line
# TrainConfig's tuple fields whose flag is given once per value, under a singular name.
REPEATABLE_FLAGS = {"extensions": "--extension", "extra_sources": "--extra-source"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="starting configuration (default: 'default', one GPU; 'cpu': ~30 min on 2 cores; "
                             "'tiny': seconds)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last save")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "head_weights":
            parser.add_argument(flag, type=float, nargs="+", default=None, help="per-head loss factors")
        elif f.name == "extensions":
            parser.add_argument(REPEATABLE_FLAGS[f.name], dest="extensions", action="append", default=None,
                                help="file ending read from --source and --extra-source, repeatable "
                                     "(default .py), e.g. --extension .txt --extension .md")
        elif f.name == "extra_sources":
            parser.add_argument(REPEATABLE_FLAGS[f.name], dest="extra_sources", action="append", default=None,
                                help="another folder of training files (repeatable), e.g. a site-packages")
        elif f.name == "schedule_to_budget":
            parser.add_argument(flag, action="store_true", default=None,
                                help="with --time-budget-s: set max_steps from the measured step time")
        elif f.name == "compile":
            parser.add_argument(flag, default=None, metavar="BACKEND",
                                help="compile with torch.compile: inductor (needs a C++ compiler on a CPU) or "
                                     "aot_eager; the whole training step, or each block under FSDP or the "
                                     "sequential head schedule. none (the default): eager. --resume keeps the "
                                     "run's own unless given")
        elif f.name == "activation_checkpointing":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help="recompute each block's forward in the backward instead of keeping its "
                                     "activations: less memory, about one more forward of the blocks per step "
                                     "(default off; --resume keeps the run's own unless given)")
        elif f.name == "progress":
            parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                                help="no progress bar")
        else:
            help_text = f"default: the preset's, else {f.default}"
            if f.type in ("int", "Optional[int]"):
                parser.add_argument(flag, type=int, default=None, help=help_text)
            elif f.type in ("float", "Optional[float]"):
                parser.add_argument(flag, type=float, default=None, help=help_text)
            else:
                choices = {"head_schedule": HEAD_SCHEDULES, "distributed": ("none", "ddp", "fsdp"),
                           "export_dtype": tuple(_EXPORT_DTYPES)}.get(f.name)
                parser.add_argument(flag, default=None, choices=choices, help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    name = args.preset or "default"
    if "warmup_steps" not in overrides:
        preset = PRESETS[name]
        overrides["warmup_steps"] = shorter_warmup(preset["warmup_steps"], preset["max_steps"],
                                                   overrides.get("max_steps"))
    return preset_config(name, **overrides)


def shorter_warmup(warmup_steps: int, steps: int, given_steps) -> int:
    """The warmup of a run of given_steps (None: the default `steps`) when no warmup is given: the
    default warmup_steps, or its share warmup_steps / steps of a run shorter than that warmup (which
    the default would not fit)."""
    if isinstance(given_steps, int) and not isinstance(given_steps, bool) and 0 < given_steps < warmup_steps:
        return warmup_steps * given_steps // steps
    return warmup_steps


# What a resumed run may change; every other flag must repeat the saved value or be left out. The
# source folder may move (its files are rebuilt into the cache with the run's own tokenizer, and a
# resume that finds other token counts says the corpus changed).
RESUMABLE = frozenset({"out_dir", "max_steps", "time_budget_s", "eval_every", "save_every", "log_every", "progress",
                       "device", "source", "compile", "activation_checkpointing"})
_PATHS = ("corpus_dir", "source", "tokenizer", "out_dir")


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """cfg with its folders and files absolute, as the run log keeps them: a run resumed from another
    working folder finds its corpus."""
    paths = {k: str(Path(getattr(cfg, k)).resolve()) for k in _PATHS if getattr(cfg, k) is not None}
    return dataclasses.replace(cfg, **paths, extra_sources=tuple(str(Path(p).resolve()) for p in cfg.extra_sources))


def resumed_config(cfg: TrainConfig, given: set, preset: Optional[str] = None) -> TrainConfig:
    """The configuration `mtp train --resume` continues with: the run's own (out_dir/train_log.json),
    in the given out_dir (the folder may have been moved or copied), with the RESUMABLE knobs among the
    `given` (command-line) fields. Any other given field that differs from the saved value is an error
    naming it: it would otherwise be dropped without a word; so is a `preset` other than the one the
    run was started with (where its log says)."""
    run_log = read_json_object(Path(cfg.out_dir) / "train_log.json")
    saved = run_log.get("config")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(saved, dict) or not set(saved) <= names:
        raise ValueError(f"{Path(cfg.out_dir) / 'train_log.json'} has no training configuration this version reads")

    def saved_value(name):   # a log older than a field ran with the field's default
        return saved[name] if name in saved else json.loads(json.dumps(getattr(TrainConfig, name, None)))

    def same(name, value, old):
        if name in _PATHS and value is not None and old is not None:
            return Path(value).resolve() == Path(old).resolve()
        if name == "extensions":   # a set of endings, matched in any case: order, repeats and case do not matter
            return sorted({e.lower() for e in value}) == sorted({e.lower() for e in old})
        return json.loads(json.dumps(value)) == old     # tuples were saved as lists
    clashes = [f"{REPEATABLE_FLAGS.get(k, '--' + k.replace('_', '-'))} {getattr(cfg, k)!r} (the run has {saved_value(k)!r})"
               for k in sorted(given - RESUMABLE) if not same(k, getattr(cfg, k), saved_value(k))]
    if preset is not None and run_log.get("preset", preset) != preset:
        clashes.append(f"--preset {preset} (the run was started with --preset {run_log['preset']})")
    if clashes:
        raise ValueError("--resume continues the run with its saved configuration, and these flags differ from "
                         f"it: {'; '.join(clashes)}. Leave them out, or start a new run in another --out-dir "
                         f"(a resumed run may change {', '.join(sorted(RESUMABLE))})")
    changed = {k: getattr(cfg, k) for k in given & RESUMABLE}
    if "max_steps" in changed:   # an explicit length replaces a schedule fitted to the time budget
        changed["schedule_to_budget"] = False
    return TrainConfig(**{**saved, **changed})


def run(args: argparse.Namespace) -> int:
    cfg = absolute_paths(config_from_args(args))
    if args.resume and cfg.out_dir and (Path(cfg.out_dir) / "trainer_state.json").is_file():
        given = {f.name for f in dataclasses.fields(TrainConfig) if getattr(args, f.name, None) is not None}
        cfg = resumed_config(cfg, given | {"out_dir"}, args.preset)
    summary = train(cfg, resume=args.resume, preset=args.preset or "default")["summary"]
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=1))
    return 0

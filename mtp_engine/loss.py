"""The multi-token training loss: targets for n heads and the fused loss as a module.

    loss_fn = MTPLoss(4)
    out = loss_fn(model.head_hidden(tokens), model.output.weight, tokens)
    out.loss.backward(); log(out.per_head)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from mtp_kernels import fused_linear_cross_entropy
from mtp_kernels.linear_ce_driver import check_loss_options, is_token_dtype


def mtp_targets(tokens: torch.Tensor, n: int, ignore_index: int = -100) -> torch.Tensor:
    """tokens: (B, T) int. Returns (n, B, T) int64: head i at position t gets tokens[t+1+i],
    ignore_index where t+1+i runs past the end."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a (batch, seq) tensor, got {shape}")
    if not is_token_dtype(tokens.dtype):
        raise ValueError(f"tokens must be an integer tensor of token ids, got {tokens.dtype}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    B, T = tokens.shape
    out = torch.full((n, B, T), ignore_index, dtype=torch.int64, device=tokens.device)
    for i in range(n):
        shift = i + 1
        if shift < T:
            out[i, :, : T - shift] = tokens[:, shift:]
    return out


@dataclass
class MTPLossOutput:
    loss: torch.Tensor        # scalar to backpropagate: sum_i lambda_i * loss_i
    per_head: torch.Tensor    # (n,) float32, detached, unweighted loss of each head


class MTPLoss(nn.Module):
    """n-head cross-entropy over a shared unembedding, logits never materialized.

    forward(head_hidden (n, B, T, D), weight (V, D), tokens (B, T)) -> MTPLossOutput.
    Options follow `mtp_kernels.fused_linear_cross_entropy`.
    """

    def __init__(self, n_future: int, *, ignore_index: int = -100, head_weights: Optional[Sequence[float]] = None,
                 label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                 accum_dtype: Optional[torch.dtype] = torch.float32, max_scratch_bytes: Optional[int] = None):
        super().__init__()
        if isinstance(n_future, bool) or not isinstance(n_future, int) or n_future < 1:
            raise ValueError(f"n_future must be an int >= 1, got {n_future!r}")
        check_loss_options(label_smoothing, z_loss, softcap, ignore_index, head_weights)
        if head_weights is not None and len(head_weights) != n_future:
            raise ValueError(f"head_weights has {len(head_weights)} entries for {n_future} heads")
        self.n_future = n_future
        self.ignore_index = ignore_index
        self.head_weights = None if head_weights is None else [float(x) for x in head_weights]
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.accum_dtype = accum_dtype
        self.max_scratch_bytes = max_scratch_bytes

    def forward(self, head_hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor) -> MTPLossOutput:
        for name, value in (("head_hidden", head_hidden), ("weight", weight), ("tokens", tokens)):
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"MTPLoss: {name} must be a tensor, got {type(value).__name__}"
                                 + (" (tokens must be a (batch, seq) tensor)" if name == "tokens" else ""))
        if head_hidden.dim() != 4 or head_hidden.shape[0] != self.n_future:
            raise ValueError(f"head_hidden must be ({self.n_future}, B, T, D), got {tuple(head_hidden.shape)}")
        n, B, T, D = head_hidden.shape
        if tuple(tokens.shape) != (B, T):
            raise ValueError(f"tokens must be ({B}, {T}) to match head_hidden, got {tuple(tokens.shape)}")
        targets = mtp_targets(tokens, n, self.ignore_index).view(n, B * T)
        loss, per_head = fused_linear_cross_entropy(
            head_hidden.reshape(n, B * T, D), weight, targets, ignore_index=self.ignore_index,
            head_weights=self.head_weights, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
            softcap=self.softcap, accum_dtype=self.accum_dtype, max_scratch_bytes=self.max_scratch_bytes,
            return_per_head=True)
        return MTPLossOutput(loss, per_head)

"""Sampling arguments and log-probabilities. Tokens are chosen by the kernels' `linear_argmax` and
`linear_sample` (mtp_kernels.sampling), plain and speculative decoding alike.

The nucleus rule is the Llama release's `sample_top_p`: sort descending, drop a token only when the
cumulative probability before it exceeds top_p (so the token that crosses top_p is kept, and at least
one token always survives), renormalize, draw. A token whose mass before equals top_p exactly is
kept, as in the release (uniform or zeroed logits make such ties).
"""
from __future__ import annotations

import math
import numbers

import torch

from mtp_kernels.reference import sample_top_p  # noqa: F401  (re-exported: the release's name)
from mtp_kernels.sampling import MIN_TEMPERATURE


def check_sampling_args(temperature: float, top_p: float) -> None:
    """Raise ValueError unless temperature is 0 or in [MIN_TEMPERATURE, inf) and 0 < top_p <= 1 (both
    finite numbers)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g} (1 / temperature must be "
                         f"finite in float32), got {temperature}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not math.isfinite(top_p):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of `tokens` (B,) under the untempered logits (B, V), as the release reports it."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)

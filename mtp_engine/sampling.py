"""Sampling arguments and log-probabilities. Tokens are chosen by the kernels' `linear_argmax` and
`linear_sample` (mtp_kernels.sampling), plain and speculative decoding alike.

The nucleus rule is the Llama release's `sample_top_p`: sort descending, drop a token only when the
cumulative probability before it exceeds top_p (so the token that crosses top_p is kept, and at least
one token always survives), renormalize, draw. A token whose mass before equals top_p exactly is
kept, as in the release (uniform or zeroed logits make such ties).
"""
from __future__ import annotations

import torch

from mtp_kernels.reference import sample_top_p  # noqa: F401  (re-exported: the release's name)
from mtp_kernels.sampling import check_sampling_args  # noqa: F401  (re-exported: the generator's argument rule)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of `tokens` (B,) under the untempered logits (B, V), as the release reports it."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)

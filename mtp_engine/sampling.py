"""Sampling arguments and log-probabilities. Tokens are chosen by the kernels' `linear_argmax` and
`linear_sample` (mtp_kernels.sampling), plain and speculative decoding alike.

The nucleus rule is the Llama release's `sample_top_p`: sort descending, drop a token only when the
cumulative probability before it exceeds top_p (so the token that crosses top_p is kept, and at least
one token always survives), renormalize, draw. A token whose mass before equals top_p exactly is
kept, as in the release (uniform or zeroed logits make such ties).
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from mtp_kernels.reference import sample_top_p  # noqa: F401  (re-exported: the release's name)
from mtp_kernels.sampling import check_sampling_args  # noqa: F401  (re-exported: the generator's argument rule)


def sequence_seeds(seed, n: int) -> list:
    """One sampling seed per prompt, each an int in [0, 2**63): seed an int s -> prompt_seed(s, i) for
    prompt i, a sequence of n ints -> those, None -> n fresh draws from torch's global CPU RNG (so
    torch.manual_seed makes a seed=None run repeatable). ValueError names a bad seed."""
    if seed is None:
        return torch.randint(0, 2 ** 63 - 1, (n,), dtype=torch.int64).tolist()
    if getattr(seed, "ndim", 0) >= 1:   # a tensor or array of seeds counts as the list it holds
        seed = seed.tolist()
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence):
        seed = _seed_int(seed, "seed")
        return [prompt_seed(seed, i) for i in range(n)]
    if len(seed) != n:
        raise ValueError(f"seed: a list of seeds needs one per prompt, got {len(seed)} for {n} prompt(s)")
    return [_seed_int(s, f"seed[{i}]") for i, s in enumerate(seed)]


def prompt_seed(seed: int, index: int) -> int:
    """The seed prompt `index` samples with in a call given the int `seed`: a hash of both (SplitMix64's
    mixer), so the prompts of one call have unrelated streams, and so do calls with seeds s and s + 1
    (with s + index, prompt 1 of seed s would repeat prompt 0 of seed s + 1 draw for draw)."""
    return _mix64(_mix64(seed) ^ index) >> 1


def _mix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _UINT64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _UINT64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _UINT64
    return x ^ (x >> 31)


_UINT64 = (1 << 64) - 1


def _seed_int(value, name: str) -> int:
    if not isinstance(value, bool):
        try:
            value = operator.index(value)   # numpy integers too
        except TypeError:
            pass
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
        rule = ("None or an int in [0, 2**63), or a list of such ints (one per prompt)" if name == "seed"
                else "an int in [0, 2**63)")
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return value


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of `tokens` (B,) under the untempered logits (B, V), as the release reports it."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)

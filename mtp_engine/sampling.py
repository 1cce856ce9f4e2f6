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
from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

import torch

from mtp_kernels.reference import sample_top_p  # noqa: F401  (re-exported: the release's name)
from mtp_kernels.penalties import TokenPenalties, check_penalties
from mtp_kernels.sampling import check_min_p, check_sampling_args, check_top_k


@dataclass
class RowSampling:
    """A generate call's sampling, one value per cache row (rows in the Generator's order), on the
    device: seeds (B,) int64 key each row's noise (with the drawn token's position as offset);
    temperature (B,) float32, 0 for a greedy row; top_p 1.0 for every row or (B,) float32, top_k 0
    for every row or (B,) int64, and min_p 0.0 for every row or (B,) float32 (any of them as a tensor
    sends the call down the kernels' nucleus path: float32 logits, the cuts and nucleus in torch;
    numbers alone keep the Gumbel-max kernel), with max_top_k a host int bounding the top_k tensor's
    values (`linear_sample`'s), or None. penalties: None, or (B, 3) float32, each row's repetition,
    presence and frequency penalties (kernels/penalties.py; the logits path too), with the rows'
    history beside them once `with_history` made it: counts (B, V) int32 of the tokens each row
    generated, prompt_seen (B, V) bool of its prompt's tokens. biases: None, or a host list of each
    row's logit_bias dict (or None), with logit_bias (B, V) float32 once `with_history` made it (the
    logits path too). The tensors are a step's inputs, so one CUDA graph serves any values of one
    layout (which of top_p, top_k, min_p, penalties and logit_bias are tensors, and max_top_k:
    `graph_key`)."""
    seeds: torch.Tensor
    temperature: torch.Tensor
    top_p: Union[float, torch.Tensor]
    top_k: Union[int, torch.Tensor] = 0
    max_top_k: Optional[int] = None
    min_p: Union[float, torch.Tensor] = 0.0
    penalties: Optional[torch.Tensor] = None
    counts: Optional[torch.Tensor] = None
    prompt_seen: Optional[torch.Tensor] = None
    logit_bias: Optional[torch.Tensor] = None
    biases: Optional[list] = None

    def head(self, rows: int) -> "RowSampling":
        """The first `rows` rows' (the rows a step runs): views."""
        return self.rows(0, rows)

    def rows(self, start: int, stop: int) -> "RowSampling":
        """Rows start..stop-1 (a prompt just moved into a row): views, history included."""
        return self.from_tensors(tuple(t[start:stop] for t in self.tensors()))

    def pick(self, indices: Sequence[int]) -> "RowSampling":
        """A copy holding these rows' values, in this order (the rows a generate call starts with, or
        one prompt's); no history."""
        index = torch.tensor(list(indices), dtype=torch.long, device=self.seeds.device)
        picked = replace(self, counts=None, prompt_seen=None, logit_bias=None)
        picked = picked.from_tensors(tuple(t[index] for t in self._values()))
        picked.biases = None if self.biases is None else [self.biases[i] for i in indices]
        return picked

    def set_row(self, row: int, source: "RowSampling", index: int) -> None:
        """Row `row` takes source's row `index` (a waiting prompt moving into a free cache row): device
        copies, no host sync. Its history is `start_history`'s to reset."""
        for mine, theirs in zip(self._values(), source._values()):
            mine[row] = theirs[index]
        if self.biases is not None:
            self.biases[row] = source.biases[index]

    def _values(self) -> tuple:
        """The per-row sampling values (tensors), without the history."""
        return (self.seeds, self.temperature) + tuple(v for v in (self.top_p, self.top_k, self.min_p, self.penalties)
                                                      if isinstance(v, torch.Tensor))

    def tensors(self) -> tuple:
        """The per-row tensors, as a CUDA-graph step takes them (`from_tensors` undoes it)."""
        history = () if self.counts is None else (self.counts, self.prompt_seen)
        return self._values() + history + (() if self.logit_bias is None else (self.logit_bias,))

    def from_tensors(self, tensors: tuple) -> "RowSampling":
        """This sampling's layout (which of top_p, top_k, min_p and penalties are per row, and whether
        it has a history) over other tensors: inside a step, its inputs. A CUDA graph's padding rows
        hold zeros: temperature 0 makes them greedy, top_k and min_p 0 cut nothing, their top_p 0 is
        raised to the smallest valid one (keep the most likely token), their repetition penalty 0 to
        1, and with no history they have seen no token, so no penalty applies."""
        rest = list(tensors[2:])
        top_p = rest.pop(0).clamp(min=torch.finfo(torch.float32).tiny) if isinstance(self.top_p, torch.Tensor) else 1.0
        top_k = rest.pop(0) if isinstance(self.top_k, torch.Tensor) else 0
        min_p = rest.pop(0) if isinstance(self.min_p, torch.Tensor) else 0.0
        penalties = None
        if self.penalties is not None:   # padding rows' zeros: repetition 1, no penalty
            penalties = rest.pop(0)
            penalties = torch.cat([torch.where(penalties[:, :1] > 0, penalties[:, :1], 1.0), penalties[:, 1:]], dim=1)
        counts, prompt_seen = (rest.pop(0), rest.pop(0)) if self.counts is not None else (None, None)
        logit_bias = rest.pop(0) if self.logit_bias is not None else None
        return RowSampling(tensors[0], tensors[1], top_p, top_k, self.max_top_k, min_p, penalties, counts, prompt_seen,
                           logit_bias)

    @property
    def graph_key(self) -> tuple:
        return ("sampled", isinstance(self.top_p, torch.Tensor), isinstance(self.top_k, torch.Tensor),
                isinstance(self.min_p, torch.Tensor), self.max_top_k, self.penalties is not None,
                self.logit_bias is not None)

    # -------------------------------------------------------------- penalties' history
    def with_history(self, vocab_size: int) -> "RowSampling":
        """This sampling with an empty history for each row (`start_history` fills a row's): with
        penalties, no token generated nor seen; with biases, a zero logit bias."""
        rows, device = self.seeds.shape[0], self.seeds.device
        history = replace(self)
        if self.penalties is not None:
            history.counts = torch.zeros(rows, vocab_size, dtype=torch.int32, device=device)
            history.prompt_seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
        if self.biases is not None:
            history.logit_bias = torch.zeros(rows, vocab_size, dtype=torch.float32, device=device)
        return history

    def start_history(self, row: int, prompt: Sequence[int]) -> None:
        """Row `row` starts a sequence with this prompt: nothing generated, the prompt's tokens seen,
        and its logit bias (`biases[row]`) in place."""
        device = self.seeds.device
        if self.counts is not None:
            self.counts[row].zero_()
            self.prompt_seen[row].zero_()
            self.prompt_seen[row, torch.tensor(list(prompt), dtype=torch.long, device=device)] = True
        if self.logit_bias is not None:
            self.logit_bias[row].zero_()
            bias = self.biases[row] or {}
            if bias:
                self.logit_bias[row, torch.tensor(list(bias), dtype=torch.long, device=device)] = torch.tensor(
                    list(bias.values()), dtype=torch.float32, device=device)

    def count(self, tokens: torch.Tensor) -> None:
        """The first R rows generated `tokens`: (R,) or (R, W) int64 on the device, -1 for none (a
        finished row's count no longer matters: `start_history` resets it). No host sync."""
        if self.counts is None:
            return
        tokens = tokens.reshape(tokens.shape[0], -1)
        self.counts[:tokens.shape[0]].scatter_add_(1, tokens.clamp(min=0), (tokens >= 0).to(torch.int32))

    def token_penalties(self) -> Optional[TokenPenalties]:
        """The kernels' penalties and logit bias for these rows (`linear_sample`), or None without
        either."""
        if self.penalties is None:
            return None if self.logit_bias is None else TokenPenalties(None, None, None, None, None, bias=self.logit_bias)
        return TokenPenalties(self.counts, self.prompt_seen, self.penalties[:, 0], self.penalties[:, 1],
                              self.penalties[:, 2], bias=self.logit_bias)


def per_prompt_values(value, n: int, name: str) -> Tuple[list, list]:
    """A generate argument for each of n prompts: one value for all, or a sequence (list, tuple,
    array, tensor) of n. Returns (values, labels): the labels name each value in an error message
    (`name`, or `name[i]` for a list's)."""
    if hasattr(value, "ndim") and hasattr(value, "tolist"):   # an array or tensor: the list it holds,
        value = value.tolist()                                 # or the number (0-d)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != n:
            raise ValueError(f"{name}: a list needs one value per prompt, got {len(value)} for {n} prompt(s)")
        return list(value), [f"{name}[{i}]" for i in range(n)]
    return [value] * n, [name] * n


def per_prompt(value, n: int, name: str) -> list:
    """temperature, top_p, top_k, min_p or a penalty (repetition_penalty, presence_penalty,
    frequency_penalty) for each of n prompts (`per_prompt_values`), each checked by
    `check_sampling_args`', `check_top_k`'s, `check_min_p`'s or `check_penalties`' rule: floats, or
    ints for top_k."""
    values, labels = per_prompt_values(value, n, name)
    labels = [f"{label}: " if label != name else "" for label in labels]
    if name == "top_k":
        for v, label in zip(values, labels):
            check_top_k(v, label)
        return [int(v) for v in values]
    for v, label in zip(values, labels):
        if name == "min_p":
            check_min_p(v, label)
        elif name == "repetition_penalty":
            check_penalties(v, 0.0, 0.0, label)
        elif name in ("presence_penalty", "frequency_penalty"):
            check_penalties(1.0, *((v, 0.0) if name == "presence_penalty" else (0.0, v)), label)
        elif name == "temperature":
            check_sampling_args(v, 1.0, label)
            if v > FLOAT32_MAX:   # the rows' temperatures are float32 on the device
                raise ValueError(f"{label}temperature must be at most float32's largest value, {FLOAT32_MAX:.4g}, "
                                 f"got {v}")
        else:
            check_sampling_args(0.0, v, label)
    return [float(v) for v in values]


FLOAT32_MAX = torch.finfo(torch.float32).max


def sequence_seeds(seed, n: int) -> list:
    """One sampling seed per prompt, each an int in [0, 2**63): seed an int s -> prompt_seed(s, i) for
    prompt i, a sequence of n ints (`per_prompt_values`) -> those, None -> n fresh draws from torch's
    global CPU RNG (so torch.manual_seed makes a seed=None run repeatable). ValueError names a bad
    seed."""
    if seed is None:
        return torch.randint(0, 2 ** 63 - 1, (n,), dtype=torch.int64).tolist()
    values, labels = per_prompt_values(seed, n, "seed")
    if labels[0] == "seed":   # one int for every prompt: a hash per prompt
        seed = _seed_int(values[0], "seed")
        return [prompt_seed(seed, i) for i in range(n)]
    return [_seed_int(s, label) for s, label in zip(values, labels)]


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

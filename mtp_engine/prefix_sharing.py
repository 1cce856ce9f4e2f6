"""Prompt prefixes shared between the cache rows of one generate call: computed once, copied.

Many requests repeat a prompt's beginning: n samples of one prompt (pass@k on code), few-shot
prompts with the same examples, a system prompt. A cache row already holding K/V for a prompt's
first s tokens lets another row skip them: `Transformer.copy_cache_prefix` copies those slots
(K is stored rotated by its absolute position, the same in both rows) and the prefill computes
only the rest, at positions s.. (forward_cached with cache_seqlens = s). Attention in the new row
then reads exactly what its own prefill would have written, up to rounding (a forward over fewer
positions sums its matmuls in another order: the same caveat as a prompt alone against it in a
batch, see Generator.generate).

Two places use it (`Generator._prefill`, `Generator._fill_free_rows`):

- the rows a call starts with (`share_plan`): a prompt sharing a prefix with an earlier one is
  prefilled after it, in a second pass over the dependent rows, from the end of the shared prefix;
  the pass costs one more forward (a weight read), so it runs only when the tokens it saves are
  worth more than prefill_groups' cost of a forward;
- a row taking a waiting prompt (continuous batching): the longest prefix any row still holds,
  its own finished sequence included (the next sample of the same prompt then copies nothing).

What a row holds (`cached_tokens`): its prompt and every kept token but the last, which is the
next step's input and has no K/V yet; a row parked after its sequence ended holds nothing usable
(a parked row rewrites its first slots every step).

Limits: only rows of the same call share (the caches are the call's scratch; a new call starts
over), and a dependent row of the first prefill shares with an independent one only (one extra
pass, not a chain of them).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token-id sequences (vectorized: prompts run to
    thousands of tokens and a refill compares against every row)."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64)
    first = int(differ.argmax())
    return first if differ[first] else n


def usable_prefix(common: int, length: int, logprobs: bool) -> int:
    """How many of a prompt's `length` tokens may come from a row sharing its first `common`: never
    the last one (its hidden state gives the first new token), and with prompt log-probs never the
    last shared one either (the log-prob of the first computed token comes from the hidden state
    before it, which the copy does not carry; the shared tokens' log-probs come from the source)."""
    return max(0, min(common - int(logprobs), length - 1))


def cached_tokens(prompt: Sequence[int], tokens: Sequence[int], limit: Optional[int] = None) -> List[int]:
    """The tokens whose K/V a row holds, in slot order, for a sequence with this prompt and these
    kept tokens: the prompt (its prefill wrote every slot) and each kept token but the last (fed to
    a later forward, by a decode or a verify step); the first `limit` of them only (a refill
    compares them with a prompt of that length: no list of the whole sequence per row). Conservative:
    a token dropped after a stop string or an eos (not kept) may have K/V too."""
    limit = len(prompt) + len(tokens) if limit is None else limit
    if limit <= len(prompt):
        return list(prompt[:limit])
    return list(prompt) + list(tokens[:max(0, min(len(tokens) - 1, limit - len(prompt)))])


def best_source(prompt: Sequence[int], rows: Sequence[Optional[Sequence[int]]], logprobs: bool,
                prefer: Optional[int] = None) -> Tuple[Optional[int], int]:
    """(row, usable length) of the row whose cached tokens (`rows[r]`, None for a row holding
    nothing usable) give `prompt` the longest usable prefix: `prefer` (the row taking the prompt:
    no copy) on a tie, else the first; (prefer, 0) when none gives any."""
    best_row, best = prefer, 0
    for row, held in enumerate(rows):
        if held is None:
            continue
        usable = usable_prefix(common_prefix_len(prompt, held), len(prompt), logprobs)
        if usable > best or (usable == best and usable and row == prefer):
            best_row, best = row, usable
    return best_row, best


def share_plan(prompts: Sequence[Sequence[int]], logprobs: bool,
               forward_tokens: int) -> Tuple[List[int], List[Optional[Tuple[int, int]]]]:
    """How the first prefill of a call shares prefixes between its rows.

    prompts: the rows' prompts, shortest first. Each prompt in turn either shares the longest
    usable prefix it can with an earlier independent prompt (a source) or is one itself; sharing
    runs only if the dependent prompts save at least forward_tokens tokens in all (the prefill's
    price of one more forward, `prefill_groups`). Returns (order, shares): order is a permutation
    of range(len(prompts)), the sources first (shortest first), then the dependent prompts by the
    length left to compute, shortest first (the prefill's chunking needs them in that order);
    shares[k] is None for a source, else (row of its source in the new order, shared length)."""
    sources: List[int] = []
    shared = {}
    for i, prompt in enumerate(prompts):
        k, best = best_source(prompt, [prompts[s] for s in sources], logprobs)
        if best:
            shared[i] = (sources[k], best)
        else:
            sources.append(i)
    if sum(length for _, length in shared.values()) < max(1, forward_tokens):
        return list(range(len(prompts))), [None] * len(prompts)
    dependents = sorted(shared, key=lambda i: (len(prompts[i]) - shared[i][1], i))
    order = sources + dependents
    row_of = {i: row for row, i in enumerate(order)}
    shares = [None] * len(sources) + [(row_of[shared[i][0]], shared[i][1]) for i in dependents]
    return order, shares

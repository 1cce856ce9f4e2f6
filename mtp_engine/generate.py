"""Batched autoregressive generation on the static KV cache, and the release-style `Llama` front end.

Every sequence keeps its own cache length (`cache_seqlens[b]`, per-sequence rotary positions):
prompts of similar length are right-padded for one prefill forward (`prefill_groups`; a long one
in chunks of PREFILL_CHUNK_TOKENS tokens), never left-padded. A real prompt position only attends
causally to earlier real ones, and a pad slot is overwritten by the sequence's next token before
anything reads it, so padding changes no result: batched output equals one-prompt-at-a-time output
token for token, up to float rounding (matmuls over other row counts sum in other orders: two
tokens whose scores tie within it can break either way; see Generator.generate).

Per-sequence state (`SequenceState`) is explicit so that self-speculative decoding, which accepts
a different number of tokens per sequence and step, reuses the same bookkeeping
(`Generator._run_speculative`; trees and the step's tensor logic are in `speculative.py`).
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import inspect
import operator
import time
import warnings
from dataclasses import dataclass, field
from typing import FrozenSet, List, Optional, Sequence, Tuple

import torch

from mtp_kernels import compact_kv_cache, dependent_launch, linear_logits
from mtp_kernels.launch_tuner import TritonError
from mtp_kernels.penalties import check_logit_bias, neutral as neutral_penalties

from .cuda_graphs import CUDAGraphSteps, graph_bucket, next_power_of_two
from .model import Transformer
from .prefix_sharing import best_source, cached_tokens, share_plan
from .sampling import RowSampling, per_prompt, per_prompt_values, sequence_seeds, token_logprobs
from .speculative import (DEFAULT_TREE_TOKENS, ONE_READ_MAX_ROWS, SPECULATIVE_MODES, TokenTree, accept_step,
                          build_candidates, check_rates, default_tree, draft_tokens, drafts_from_scores,
                          tree_paths, verify_and_score, verify_tokens)
from .speculative import token_tree as speculative_tree
from .tokenizer import TextStream


@dataclass
class GenerationResult:
    """tokens[b]: generated ids of prompt b (eos excluded); text[b]: their decoding (None without a tokenizer).

    finish_reasons[b]: "eos", "stop" (its text reached one of generate's stop strings: tokens[b]
    ends with the token that completed it, text[b] ends before it; or it drew one of generate's
    stop_token_ids, not kept, as eos is not), "max_gen_len", "max_seq_len"
    (the cache was full; a prompt of max_seq_len tokens generates nothing), or "cancelled" (generate's
    on_tokens returned True for it: tokens[b] are those handed over until then).
    logprobs[b] / prompt_logprobs[b]: only when generate(logprobs=True); prompt_logprobs[b][0] is 0.0
    (the first prompt token has no context), as in the Llama release.
    stats: batch_size, prompt_tokens, generated_tokens, forwards (decode or verify steps, plus one
    for the first prefill and one for each refill of a row by a waiting prompt, or one per batch of
    max_batch_size prompts when nothing is generated), prefill_forwards (the forwards all prefills
    ran, one per group of similar prompt lengths and chunk of PREFILL_CHUNK_TOKENS, plus one per
    group of the rows that share a prefix), shared_prompt_tokens (prompt tokens not computed: their
    K/V was copied from a row holding them, or left in place in the row's own slots by its finished
    sequence; Generator's share_prefixes),
    tokens_per_forward (tokens produced per sequence per forward it took part in, eos included: 1.0
    for plain decoding), prefill_time_s (the first prefill's: refills are inside the steps' time),
    wall_time_s, tokens_per_s, finish_counts (sequences per finish reason). Self-speculative calls
    add speculative ("chain" | "tree"), heads, tree_nodes, verify_steps, mean_accepted_drafts, acceptance_per_depth and
    acceptance_per_head (see `_speculative_stats`).
    """

    tokens: List[List[int]]
    text: Optional[List[str]]
    stats: dict
    finish_reasons: List[str]
    logprobs: Optional[List[List[float]]] = None
    prompt_logprobs: Optional[List[List[float]]] = None


@dataclass
class SequenceState:
    """One sequence's progress. `limit`: most tokens it may generate (max_gen_len clipped to the cache)."""

    prompt: List[int]
    limit: int
    limit_is_gen_len: bool = True  # False when the cache, not max_gen_len, set the limit
    eos_id: Optional[int] = None   # the token that ends it (not kept); None: none does
    stop_ids: FrozenSet[int] = frozenset()   # more tokens that end it (not kept), finish "stop"
    dropped_last: bool = False   # the last token produced ended it and was not kept (eos, a stop id)
    tokens: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    produced: int = 0   # tokens produced, eos included
    streamed: int = 0   # tokens handed to generate's on_tokens so far
    told_finish: bool = False   # on_tokens has been given the finish reason
    stop: Tuple[str, ...] = ()   # stop strings (generate's stop)
    stop_text: Optional[TextStream] = None   # the text of the tokens searched so far (stop_text.ids)
    stop_char: Optional[int] = None   # where the first stop string begins in the text of `tokens`
    forwards: int = 0   # forwards that produced tokens for this sequence
    finish: Optional[str] = None

    @property
    def done(self) -> bool:
        return self.finish is not None

    def accept(self, token: int, logprob: Optional[float] = None) -> None:
        """Append one produced token; finish on eos or a stop id (not kept) or when the limit is reached."""
        self.produced += 1
        if token == self.eos_id or token in self.stop_ids:
            self.finish, self.dropped_last = ("eos" if token == self.eos_id else "stop"), True
            return
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if len(self.tokens) >= self.limit:
            self.finish = "max_gen_len" if self.limit_is_gen_len else "max_seq_len"

    def check_stop(self) -> None:
        """After a forward: if the tokens' text now holds a stop string, keep the tokens up to the one
        that completed the first one (a speculative step may have accepted more, and an eos or the
        limit may have come after it), finish with "stop" and note where the string begins
        (stop_char). The text grows by the new tokens' (stop_text: no decode of the whole sequence
        per step) and only what they can reach is searched."""
        if not self.stop or len(self.tokens) == len(self.stop_text.ids):
            return
        checked, chars = len(self.stop_text.ids), len(self.stop_text.text)
        self.stop_text.push(self.tokens[checked:])
        start = max(0, chars - max(map(len, self.stop)) + 1)
        # held: a character still missing bytes and what came with it, searched too (the row may end here)
        if first_stop(self.stop_text.text + self.stop_text.held, self.stop, start) is None:
            return
        decode = self.stop_text.tokenizer.decode   # once per sequence: whole decodes are fine here
        for end in range(checked + 1, len(self.tokens) + 1):   # the token that completed it
            at = first_stop(decode(self.tokens[:end]), self.stop, start)
            if at is not None:
                # what the forward produced past it (an eos included) is not output: not counted
                self.produced -= len(self.tokens) - end + self.dropped_last
                del self.tokens[end:], self.logprobs[end:]
                self.finish, self.stop_char = "stop", at
                return


GENERATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # the token selection kernels' dtypes
FINISH_REASONS = ("eos", "stop", "max_gen_len", "max_seq_len", "cancelled")


def first_stop(text: str, stops: Sequence[str], start: int = 0) -> Optional[int]:
    """Where the first of the stop strings found in text[start:] begins, or None."""
    found = [at for at in (text.find(stop, start) for stop in stops) if at >= 0]
    return min(found) if found else None


# The float32 log-softmax a prefill's prompt log-probs take at once (logprobs=True): a batch of 8
# prompts of 4096 tokens at V 32000 would otherwise hold 4.2 GB of it.
PROMPT_LOGPROB_BYTES = 1 << 28

# What one more prefill forward costs, counted in prompt tokens (see prefill_groups). A forward reads
# every weight once whatever its length: on a GPU that read takes as long as the matmuls of about
# 200-300 tokens (matmul rate over bandwidth, per weight byte: DESIGN.md's figures). A CPU computes
# about as fast as it reads; there a small model's forward costs mostly its Python and launches. 64
# is a setting, not a measurement: bench_prefill.py times the grouping it gives against one forward.
PREFILL_FORWARD_TOKENS = {"cuda": 256}
PREFILL_FORWARD_TOKENS_DEFAULT = 64
# The most prompt tokens (rows x positions) one prefill forward takes: a group's prompts go through in
# chunks of positions, each attending to the chunks before it in the cache. Its activations are then
# bounded (by arithmetic, not a measurement: at the 7B shape about 90 kB a token in 16-bit for the
# MLP's two hidden projections, q/k/v and the heads' outputs, so 64 prompts of 4096 tokens in one
# forward would hold about 24 GB); and a row whose prompt has ended leaves the next chunks. At
# DESIGN.md's matmul rate and bandwidth, 16k tokens of 7B matmuls take ~100x the forward's weight read.
PREFILL_CHUNK_TOKENS = {"cuda": 16384}
PREFILL_CHUNK_TOKENS_DEFAULT = 8192


def prefill_groups(lengths: Sequence[int], forward_tokens: int) -> List[Tuple[int, int]]:
    """Split rows of prompt lengths `lengths` (shortest first) into consecutive groups [start, end),
    one prefill forward each over its prompts right-padded to its last one's length: the split with
    the fewest padded tokens computed plus forward_tokens per forward. Equal lengths stay one
    forward; a batch of 1000- and 10-token prompts no longer computes every row to 1000.
    Exact (O(B^2) on the host, B the batch size)."""
    if any(a > b for a, b in zip(lengths, lengths[1:])):
        raise ValueError(f"prefill_groups needs lengths shortest first, got {list(lengths)}")
    n = len(lengths)
    cost, cut = [0] + [float("inf")] * n, [0] * (n + 1)   # best cost of the first `end` rows, its last cut
    for end in range(1, n + 1):
        for start in range(end):
            c = cost[start] + (end - start) * lengths[end - 1] + forward_tokens
            if c < cost[end]:
                cost[end], cut[end] = c, start
    groups, end = [], n
    while end:
        groups.append((cut[end], end))
        end = cut[end]
    return groups[::-1]


def _one_call_at_a_time(generate):
    """The model's KV caches (shared by every Generator on it) and a Generator's step buffers hold
    the sequences of the call that is running: a second call on the same model while it runs (from
    its on_tokens) would overwrite them and silently corrupt the first call's output. It is refused
    instead. (A flag, not a lock: threads must not share a model.)"""
    @functools.wraps(generate)
    def guarded(self, *args, **kwargs):
        if getattr(self.model, "_generating", False):
            raise RuntimeError("a generate call is already running on this model (generate called again from "
                               "its on_tokens?): the model's KV caches hold that call's sequences; call again "
                               "once it has returned")
        self.model._generating = True
        try:
            return generate(self, *args, **kwargs)
        finally:
            self.model._generating = False
    return guarded


class Generator:
    """Plain and self-speculative batched generation with a Transformer's static KV cache.

    Construction allocates the cache: model.setup_caches(max_batch_size, max_seq_len); the first
    speculative call grows it by the tree's size - 1 slots (see _ensure_caches).
    cuda_graphs: replay decode and verify steps as CUDA graphs, one per batch-size bucket and step
    shape, each step whole (a verify step from drafts to next drafts; greedy or sampled, with or
    without log-probs) (`CUDAGraphSteps`); None means on for a CUDA model, off
    otherwise. Replay runs the captured kernels on the same inputs; the only difference from eager
    is the padding of the batch to its bucket (GEMMs of more rows), which the GPU test
    (test_cuda_graphs_do_not_change_results) checks changes no token. True fails loudly when a
    graph cannot be captured; None falls back to eager with a warning.
    tree_tokens: tree tokens per verify forward (all rows) that the default tree aims for
    (speculative.default_tree); None: DEFAULT_TREE_TOKENS for the model's device type.
    tree_rates: measured per-depth acceptance rates the default tree is built from (a checkpoint's
    tree.json "rates"; None: speculative.prior_rates).
    shared_unembed: how a greedy verify step reads the unembedding. True: once, scoring every head
    at every node (`speculative.verify_and_score`), the next drafts ranked from those scores; False:
    twice, head 0 at every node, then the drafting heads at each row's last accepted node. Same
    tokens either way. None: a graphed step of at most speculative.ONE_READ_MAX_ROWS scored rows
    (rows x nodes x heads) is captured both ways and the faster kept (one read saves a 262 MB weight
    read at the 7B shape but multiplies the rows by the heads, so it wins for few rows only); larger
    and eager steps read twice.
    share_prefixes: rows of a call whose prompts begin alike compute the shared beginning once and
    copy its K/V (`prefix_sharing`: n samples of one prompt, few-shot examples, a system prompt);
    False computes every prompt whole. The tokens are the same either way, up to rounding (the
    shared prefix's matmuls ran over other shapes).
    """

    def __init__(self, model: Transformer, tokenizer=None, max_batch_size: int = 8, max_seq_len: int = 2048,
                 cuda_graphs: Optional[bool] = None, tree_tokens: Optional[int] = None, tree_rates=None,
                 shared_unembed: Optional[bool] = None, share_prefixes: bool = True):
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("cuda_graphs", cuda_graphs), ("shared_unembed", shared_unembed)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be None, True or False, got {value!r}")
        if not isinstance(share_prefixes, bool):
            raise ValueError(f"share_prefixes must be True or False, got {share_prefixes!r}")
        if tree_tokens is not None and (isinstance(tree_tokens, bool) or not isinstance(tree_tokens, int)
                                        or tree_tokens < 1):
            raise ValueError(f"tree_tokens must be None or a positive int, got {tree_tokens!r}")
        if tree_rates is not None:
            tree_rates = check_rates(tree_rates)
        if not isinstance(model, Transformer):
            raise ValueError(f"Generator needs a Transformer (load_checkpoint gives one), got {type(model).__name__}")
        if tokenizer is not None and not all(hasattr(tokenizer, a) for a in ("decode", "eos_id")):
            raise ValueError(f"tokenizer must be None or a Tokenizer (decode, eos_id), got "
                             f"{type(tokenizer).__name__}: Tokenizer(path) reads a tokenizer.model")
        if cuda_graphs and model.output.weight.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a model on CUDA, but it is on {model.output.weight.device}")
        self.tree_tokens = tree_tokens
        self.tree_rates = tree_rates
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.cuda_graphs = cuda_graphs
        self.shared_unembed = shared_unembed
        self.share_prefixes = share_prefixes
        self._one_read = False   # what the verify step being traced does (_verify_step's variants)
        self._graphs: Optional[CUDAGraphSteps] = None
        self._cache_len = max_seq_len   # grows by a verify tree's size on the first speculative call
        # Normal tensors even when built inside inference mode (a sampling function in a training loop,
        # measure_acceptance_rates): inference-mode weights and caches would leave the model untrainable.
        with torch.inference_mode(False):
            model.fuse_projections()  # one GEMM for q/k/v and one for w1/w3 in every step (values unchanged)
            model.setup_caches(max_batch_size, max_seq_len)

    @property
    def device(self) -> torch.device:
        return self.model.output.weight.device

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    @_one_call_at_a_time
    def generate(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len=64, temperature=0.0,
                 top_p=1.0, speculative: Optional[str] = None, heads=None, tree=None,
                 seed=None, eos_id=None, logprobs: bool = False, on_tokens=None, stop=None,
                 top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                 frequency_penalty=0.0, logit_bias=None, stop_token_ids=None) -> GenerationResult:
        """Continue every prompt; prompts may differ in length, and there may be more of them than
        max_batch_size: the shortest max_batch_size start in the cache rows, and a row whose sequence
        is done (finished or cancelled) takes the next waiting prompt, shortest first (continuous
        batching: a prefill of that prompt alone into the row between two steps). Since a prompt's
        completion depends on its own arguments alone (below), it is the same whichever row and
        step it starts in.

        prompt_tokens: list of token-id lists. Each of max_gen_len, temperature, top_p, top_k, min_p,
        the three penalties, logit_bias, seed and eos_id takes one value for every prompt or a list
        with one per prompt, so a batch may mix
        requests (greedy and sampled ones among them: a step runs them all at once, and its CUDA
        graph serves any values).
        max_gen_len: most new tokens, clipped per prompt to the room left in the cache (max_seq_len -
        len(prompt)). temperature 0 is greedy; otherwise softmax(logits / temperature) restricted to
        the top_k most likely tokens (0: no cut) and to those at least min_p times as likely as the
        most likely one (min-p sampling; 0: no cut), then to the top_p nucleus of what they keep,
        drawn with noise keyed by the prompt's seed and the position of the token drawn
        (`linear_sample`), so every prompt has its own stream. A sampled batch with no top_p below 1,
        no top_k cut and no min_p samples in the Gumbel-max kernel without writing logits; otherwise
        the step writes float32 logits for its rows (chunked) and cuts them in torch. seed: ints, or for an int s
        prompt i takes `sampling.prompt_seed(s, i)` (a hash of both), or None (seeds drawn from
        torch's global CPU RNG). A prompt's completion depends on its prompt, its own arguments and
        the model alone, not on the prompts beside it nor their number: with seed=[s] alone it is
        what it is with s in any position of a list. eos_id: None means the tokenizer's eos (never
        stop early without a tokenizer); a negative id never stops early.

        speculative: None (plain decoding, one token per forward), "chain" (top-1 draft of every
        head: blockwise parallel decoding) or "tree" (a static token tree of the heads' top-k drafts).
        heads: how many heads take part, 2 <= heads <= n_future_tokens (default all); head 0 verifies,
        heads 1..heads-1 draft. tree (speculative="tree"): a list of paths in Medusa's format
        ([[0], [1], [0, 0], ...], see mtp_engine.speculative), a preset name ("heads<k>", "chain"),
        or None: the default tree for this many prompts (speculative.default_tree: at most
        `tree_tokens` tree tokens per forward over all rows, so a large batch gets a small tree).
        Greedy speculative output equals plain greedy output token for token, and so does sampled
        output with the same seed: every node draws the token at its position with the noise plain
        decoding draws that position with, so the walk accepts exactly plain decoding's tokens.
        "Equal" means up to ties within rounding (of the Gumbel-perturbed scores, when sampling):
        both choose from float32-accumulated scores (`linear_argmax`, `linear_sample`, with or
        without log-probs), but a forward over T tree nodes rounds the hidden states differently
        from a one-token forward (matmuls of other shapes sum in other orders: float32's rounding in
        float32, bf16's far coarser one in bf16), so two tokens whose scores are that close can
        break differently, and the continuations differ after that. The same holds for a prompt
        alone against it in a batch (other rows, other padding). The tests' random models have no
        such ties; a bf16 model meets them now and then.

        on_tokens: None, or a function called on the host right after each forward, once for every
        prompt that got tokens from it or finished: on_tokens(index, new_tokens, finish), index the
        prompt's place in prompt_tokens, new_tokens the token ids it kept from that forward (eos is
        not kept), finish None or its finish reason ("eos", "stop", "max_gen_len", "max_seq_len") once it is
        done (a prompt it cancels is not told "cancelled"); with logprobs=True a fourth argument, the new tokens' log-probs (a list of floats as
        long as new_tokens). A speculative forward hands over all the tokens it accepted at once. The
        tokens are on the host by then (each step's one sync), so streaming costs the function's own
        time, which counts in the wall time. Returning True (the bool: any other value, such as the
        count a write returns, is ignored) cancels that prompt: it generates nothing more (its row
        leaves the forwards as a finished one does, or takes the next waiting prompt), is not called
        again, and finishes "cancelled" with the tokens handed over so far; the others go on. What
        it raises ends generate. It may not call generate on this model again, through any
        Generator (RuntimeError: the caches hold the running call's sequences).
        repetition_penalty (> 0, 1: none), presence_penalty and frequency_penalty (0: none): vLLM's
        penalties (kernels/penalties.py), applied to the logits before the temperature, greedy
        prompts too: a token in the prompt or generated so far has its logit divided by the
        repetition penalty when positive, multiplied by it otherwise; a generated token loses
        frequency_penalty per time it was generated and presence_penalty once. A call with any
        penalty writes float32 logits for its rows (the nucleus path above) and keeps each row's
        token counts on the device ((rows, V) int32 and a (rows, V) bool mask of its prompt). Greedy
        and seeded speculative decoding still equal plain decoding: a tree node is scored against the
        history plain decoding has at its position (the accepted tokens plus the drafts on its path).
        logit_bias: None or {token id: bias} (OpenAI's and vLLM's), numbers added to those tokens'
        logits before the penalties, greedy prompts too (-100 bans a token in practice, a large
        positive bias forces it; any value within float32's range is taken, where OpenAI's API takes
        [-100, 100] and vLLM's server clamps to it); with one, the rows keep a (rows, V) float32 bias.
        Log-probs stay the model's own (no penalty, no bias, no temperature).
        stop: strings that end a completion once its text holds one (finish "stop"; needs the
        tokenizer): a str or a list of them for every prompt, or a list with one such entry (or None)
        per prompt. Its tokens end with the one that completed the string (a speculative step's later
        tokens are dropped, and not counted in tokens_per_forward) and its text ends before the
        string. Matched against the completion's own text (as `text` has it: SentencePiece drops the
        first piece's leading space), on the host after each forward; streamed tokens are handed
        over after that check.
        stop_token_ids: token ids that end a completion as eos does (not kept, finish "stop"; vLLM's
        stop_token_ids, e.g. a chat model's end-of-turn token beside its eos): a list of ints for
        every prompt, or a list with one such list (or None) per prompt.
        """
        if not isinstance(logprobs, bool):
            raise ValueError(f"logprobs must be True or False, got {logprobs!r}")
        _check_on_tokens(on_tokens, logprobs)
        dtype = self.model.output.weight.dtype
        if dtype not in GENERATION_DTYPES:
            raise ValueError(f"the model is {dtype}; generation runs in {', '.join(map(str, GENERATION_DTYPES))}: "
                             "model.to(torch.float32) first")
        heads = integer(heads)
        prompts = self._check_prompts(prompt_tokens)
        gen_lens, labels = per_prompt_values(max_gen_len, len(prompts), "max_gen_len")
        gen_lens = [integer(n) for n in gen_lens]
        for n, label in zip(gen_lens, labels):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{label} must be an int >= 0, got {n!r}")
        temperatures, top_ps = per_prompt(temperature, len(prompts), "temperature"), per_prompt(top_p, len(prompts), "top_p")
        top_ks = per_prompt(top_k, len(prompts), "top_k")
        min_ps = per_prompt(min_p, len(prompts), "min_p")
        penalty_values = list(zip(per_prompt(repetition_penalty, len(prompts), "repetition_penalty"),
                                  per_prompt(presence_penalty, len(prompts), "presence_penalty"),
                                  per_prompt(frequency_penalty, len(prompts), "frequency_penalty")))
        biases = [check_logit_bias(bias, self.model.vocab_size, label)
                  for bias, label in zip(*per_prompt_values(logit_bias, len(prompts), "logit_bias"))]
        # Rows shortest prompt first: prompts of similar length are neighbouring cache rows, which
        # prefill in one forward per group (_prefill), and the rows with the least room, which a
        # long generation ends first, are the last ones, which then leave the forward. Among the
        # rows of the first prefill, those sharing a prefix with another come after the others
        # (share_plan). Results come back in the caller's order.
        order = sorted(range(len(prompts)), key=lambda b: len(prompts[b]))
        shares = None
        if self.share_prefixes and len(prompts) > 1:   # the rows of the first prefill, sharing prefixes
            rows = min(len(prompts), self.max_batch_size)
            first, shares = share_plan([prompts[b] for b in order[:rows]], logprobs, self._forward_tokens())
            order = [order[k] for k in first] + order[rows:]
        prompts = [prompts[b] for b in order]
        tree_spec = self._check_speculative(speculative, heads, tree, rows=min(len(prompts), self.max_batch_size))
        eos_ids = [self._resolve_eos(e, label) for e, label in zip(*per_prompt_values(eos_id, len(order), "eos_id"))]
        stops = self._check_stop(stop, len(order))
        stop_ids = self._check_stop_token_ids(stop_token_ids, len(order))
        self._ensure_caches(tree_spec.size if tree_spec is not None else 1)
        if self._graphs is not None:
            self._graphs.start_call()

        seqs = []
        for b, p in zip(order, prompts):
            room, gen_len = self.max_seq_len - len(p), gen_lens[b]
            seq = SequenceState(prompt=p, limit=min(gen_len, room), limit_is_gen_len=gen_len <= room,
                                eos_id=eos_ids[b], stop_ids=stop_ids[b], stop=stops[b],
                                stop_text=TextStream(self.tokenizer) if stops[b] else None)
            if seq.limit == 0:
                seq.finish = "max_gen_len" if seq.limit_is_gen_len else "max_seq_len"
            seqs.append(seq)

        sampled = any(t > 0 for t in temperatures)
        penalized = not all(neutral_penalties(*v) for v in penalty_values)
        seeds = None   # greedy draws nothing (and leaves torch's RNG alone); a seed is still checked
        if sampled or seed is not None:
            seeds = sequence_seeds(seed, len(prompts))
        sampling = None
        if sampled or penalized or any(biases):   # one value per row, rows in length order (greedy rows: temperature 0)
            # A greedy prompt's top_p plays no part (nor sends the batch down the nucleus path); a
            # top_p below float32's range keeps its meaning there (the most likely token alone).
            top_ps = [p if t > 0 else 1.0 for t, p in zip(temperatures, top_ps)]
            # So does its top_k, and a top_k of the vocabulary or more cuts nothing: 0.
            top_ks = [k if t > 0 and k < self.model.vocab_size else 0 for t, k in zip(temperatures, top_ks)]
            min_ps = [m if t > 0 else 0.0 for t, m in zip(temperatures, min_ps)]
            sampling = RowSampling(
                torch.tensor([seeds[b] if seeds else 0 for b in order], dtype=torch.int64, device=self.device),
                torch.tensor([temperatures[b] for b in order], dtype=torch.float32, device=self.device),
                1.0 if all(p == 1.0 for p in top_ps) else
                torch.tensor([top_ps[b] for b in order], dtype=torch.float32,
                             device=self.device).clamp(min=torch.finfo(torch.float32).tiny),
                0 if not any(top_ks) else torch.tensor([top_ks[b] for b in order], dtype=torch.int64,
                                                       device=self.device),
                # the cut's torch.topk size: the largest top_k, a power of two (graphs shared by calls)
                min(next_power_of_two(max(top_ks)), self.model.vocab_size) if any(top_ks) else None,
                0.0 if not any(min_ps) else torch.tensor([min_ps[b] for b in order], dtype=torch.float32,
                                                         device=self.device),
                torch.tensor([penalty_values[b] for b in order], dtype=torch.float32,
                             device=self.device) if penalized else None,
                biases=[biases[b] or None for b in order] if any(biases) else None)

        start = time.perf_counter()
        forwards, prefill_time, prompt_lp, extra = 0, 0.0, None, {}
        self._prefill_forwards = self._shared_prompt_tokens = 0

        def stream(seq_ids: Optional[Sequence[int]] = None):
            """After each forward: stop strings, then the tokens handed over, for seqs[i], i in
            seq_ids (those in the cache rows, the only ones a forward changes) or, with None, for
            every sequence."""
            visit = range(len(seqs)) if seq_ids is None else seq_ids
            for i in visit:
                seqs[i].check_stop()
            if on_tokens is not None:
                _hand_over(seqs, visit, order, on_tokens, logprobs)
        stream()   # prompts with no room or no tokens asked for are done already
        if not all(s.done for s in seqs):
            if tree_spec is None:
                forwards, prefill_time, prompt_lp = self._run_plain(
                    prompts, seqs, sampling, logprobs, start, stream, shares)
            else:
                forwards, prefill_time, prompt_lp, extra = self._run_speculative(
                    prompts, seqs, tree_spec, sampling, logprobs, start, stream, shares)
        else:
            if logprobs:   # nothing to generate, but the prompts' log-probs were asked for
                prompt_lp, forwards = self._score_prompts(prompts, shares)
                prefill_time = time.perf_counter() - start
            if tree_spec is not None:
                extra = _speculative_stats(tree_spec, SpeculativeCounters(tree_spec.max_depth))
        wall = time.perf_counter() - start

        seqs = _in_caller_order(seqs, order)
        prompt_lp = None if prompt_lp is None else _in_caller_order(prompt_lp, order)
        tokens = [s.tokens for s in seqs]
        generated = sum(len(t) for t in tokens)
        seq_forwards = sum(s.forwards for s in seqs)
        stats = {
            "batch_size": len(seqs),
            "prompt_tokens": sum(len(p) for p in prompts),
            "generated_tokens": generated,
            "forwards": forwards,
            "prefill_forwards": self._prefill_forwards,
            "shared_prompt_tokens": self._shared_prompt_tokens,
            "finish_counts": {reason: sum(s.finish == reason for s in seqs) for reason in FINISH_REASONS},
            "tokens_per_forward": (sum(s.produced for s in seqs) / seq_forwards) if seq_forwards else 0.0,
            "prefill_time_s": prefill_time,
            "wall_time_s": wall,
            "tokens_per_s": generated / wall if wall > 0 else 0.0,
            **extra,
        }
        if tree_spec is not None:
            stats["speculative"] = speculative
        text = ([self.tokenizer.decode(s.tokens)[:s.stop_char] for s in seqs] if self.tokenizer is not None
                else None)
        return GenerationResult(
            tokens=tokens, text=text, stats=stats, finish_reasons=[s.finish for s in seqs],
            logprobs=[s.logprobs for s in seqs] if logprobs else None,
            prompt_logprobs=prompt_lp)

    # ------------------------------------------------------------------ plain decoding
    def _run_plain(self, prompts, seqs, sampling: Optional[RowSampling], logprobs, start, stream, shares=None):
        """One token per sequence per forward; sampling (None: greedy) keys each row's noise by its
        seed and the new token's position; stream() after each forward checks the stop strings and
        hands the new tokens to generate's on_tokens; shares: the first prefill's shared prefixes
        (`_prefill`). Returns (forwards, prefill_time, prompt_logprobs)."""
        slots = _Slots(len(seqs), self.max_batch_size)
        row_sampling = self._row_sampling(sampling, slots, prompts)
        last_hidden, prompt_lp = self._prefill(prompts[:slots.rows], logprobs, shares=shares)
        prompt_lp = slots.all_prompt_logprobs(prompt_lp)
        forwards = 1
        prefill_time = time.perf_counter() - start
        cache_seqlens = torch.tensor([len(p) for p in prompts[:slots.rows]], dtype=torch.int32, device=self.device)
        live_key, advance = None, None
        next_tok, lps = self._next_tokens(last_hidden[:, 0], row_sampling, cache_seqlens, logprobs)
        while True:
            if row_sampling is not None:
                row_sampling.count(next_tok)   # before a refill resets a finished row's history
            for b, tok in enumerate(next_tok.tolist()):
                seq = seqs[slots.row_seq[b]]
                if not seq.done:
                    seq.forwards += 1
                    seq.accept(tok, lps[b] if lps else None)
            stream(slots.row_seq)
            refills, prefills = self._fill_free_rows(slots, prompts, seqs, sampling, row_sampling, logprobs, 1,
                                                     prompt_lp, stream)
            forwards += prefills
            if refills:
                next_tok = next_tok.clone()   # (a CUDA graph's output buffer)
                for row, (first, _) in refills.items():
                    next_tok[row] = first
            rows = slots.live_rows(seqs, cache_seqlens, prompts, refills)
            if not rows:
                break
            live = slots.live[:rows]
            if live != live_key:  # rebuilt only when a row finishes: no copy per step
                live_key = live
                advance = torch.tensor(live_key, dtype=torch.int32, device=self.device)
            next_tok, lengths, *step_lps = self._plain_step(next_tok[:rows], cache_seqlens[:rows], advance,
                                                            row_sampling and row_sampling.head(rows), logprobs)
            cache_seqlens[:rows].copy_(lengths)   # the graph advanced its own copy
            lps = step_lps[0].tolist() if logprobs else None
            forwards += 1
        return forwards, prefill_time, prompt_lp

    def _plain_step(self, tokens: torch.Tensor, cache_seqlens: torch.Tensor, advance: torch.Tensor,
                    sampling: Optional[RowSampling] = None, logprobs: bool = False):
        """A plain step for R rows as one function, one CUDA graph when graphs are on (as a verify
        step is): the decode forward of tokens (R,) at slots cache_seqlens (R,) int32, head 0's next
        tokens (`linear_argmax`, or `linear_sample` with the R rows' sampling, keyed by their seeds and
        the new position), the lengths plus `advance` (R,) int32 (1 for a live row), and with logprobs
        the tokens' log-probs. The noise is a function of device tensors, so a sampled step graphs as
        a greedy one does. Returns (next tokens (R,), advanced lengths (R,)[, log-probs (R,)
        float32]); cache_seqlens is not changed."""
        def step(tokens, lengths, advance, *sampled):
            hidden = self._forward(tokens[:, None], lengths, None)[:, 0, 0]
            # The new token's position is lengths + 1 (a finished row's draw is ignored).
            next_tokens = self._choose(hidden[:, None], sampling.from_tensors(sampled) if sampled else None,
                                       lengths[:, None] + 1)[:, 0]
            outputs = (next_tokens, lengths + advance)
            return outputs + (token_logprobs(self._logits(hidden), next_tokens),) if logprobs else outputs

        key, inputs = ("plain",), (tokens, cache_seqlens, advance)
        if sampling is not None:
            key, inputs = key + sampling.graph_key, inputs + sampling.tensors()
        key += ("logprobs",) if logprobs else ()
        return self._graphed(key, step, inputs, variants=lambda: self._with_programmatic_launch(None))

    # ------------------------------------------------------------------ self-speculative decoding
    def _run_speculative(self, prompts, seqs, tree: TokenTree, sampling: Optional[RowSampling], want_logprobs,
                         start, stream, shares=None):
        """Draft with heads 1.., verify a whole token tree per forward with head 0.

        Prefill runs every head: at the last prompt position head 0 gives the first token (the
        root of the first tree) and heads 1.. the drafts. Each step then runs one forward over the
        T tree nodes of every live row (tree mask, per-node depths), takes head 0's verifier token
        at every node, walks the tree (tree_accept), emits the accepted drafts and the bonus token,
        compacts the accepted nodes' K/V into consecutive cache slots (compact_kv_cache) and takes
        the next drafts from the heads at each row's last accepted node: no extra forward.

        Host syncs: one `.tolist()` per step (accepted lengths and tokens, for eos/limit and the
        per-sequence bookkeeping; with logprobs=True the accepted tokens' log-probs, computed in the
        step from head 0's logits there, follow in a second copy that no longer waits); the small
        host-to-device copies of the live mask happen right after it, when the device is idle. With
        CUDA graphs a step is one graph (`_verify_step`).
        Rows past the last live one leave the forward; finished rows inside it are parked at cache
        length 0 (`_Slots.live_rows`: their nodes are computed and ignored, their compaction length
        is 0).

        Cache room: every node of a live row needs a slot, also past max_seq_len for the nodes that
        cannot be accepted there; _ensure_caches keeps T - 1 slots beyond max_seq_len for them, so
        every step verifies the whole tree (one shape: one CUDA graph, one set of kernel tunings).

        shares: the first prefill's shared prefixes (`_prefill`).
        Returns (forwards, prefill_time, prompt_logprobs, extra stats).
        """
        device = self.device
        weight = self.model.output.weight
        tree = tree.on(device)
        counters = SpeculativeCounters(tree.max_depth)

        slots = _Slots(len(seqs), self.max_batch_size)
        row_sampling = self._row_sampling(sampling, slots, prompts)
        last_hidden, prompt_lp = self._prefill(prompts[:slots.rows], want_logprobs, n_heads=tree.heads,
                                               shares=shares)   # (B, heads, D)
        prompt_lp = slots.all_prompt_logprobs(prompt_lp)
        cache_seqlens = torch.tensor([len(p) for p in prompts[:slots.rows]], dtype=torch.int32, device=device)
        root, lps = self._next_tokens(last_hidden[:, 0], row_sampling, cache_seqlens, want_logprobs)
        if row_sampling is not None:
            row_sampling.count(root)
        drafts = draft_tokens(last_hidden[:, 1:], weight, tree.top_k)                        # (B, heads-1, top_k)
        for b, tok in enumerate(root.tolist()):
            if not seqs[b].done:
                seqs[b].forwards += 1
                seqs[b].accept(tok, lps[b] if lps else None)
        stream(slots.row_seq)
        forwards = 1
        prefill_time = time.perf_counter() - start

        live_key, live_mask = None, None
        while True:
            refills, prefills = self._fill_free_rows(slots, prompts, seqs, sampling, row_sampling, want_logprobs,
                                                     tree.heads, prompt_lp, stream)
            forwards += prefills
            if refills:
                root, drafts = root.clone(), drafts.clone()   # (a CUDA graph's output buffers)
                for row, (first, hidden) in refills.items():
                    root[row] = first
                    drafts[row] = draft_tokens(hidden[None, 1:], weight, tree.top_k)[0]
            rows = slots.live_rows(seqs, cache_seqlens, prompts, refills)
            if not rows:
                break
            live = slots.live[:rows]
            if live != live_key:  # rebuilt only when a row finishes: no copy per step
                live_key = live
                live_mask = torch.tensor(live_key, device=device)

            packed, root, drafts, step_lps = self._verify_step(root[:rows], drafts[:rows], cache_seqlens[:rows],
                                                               live_mask, tree, row_sampling and row_sampling.head(rows),
                                                               want_logprobs)
            forwards += 1
            if row_sampling is not None:
                row_sampling.count(packed[:, 1:])   # the emitted tokens (the next root among them)
            packed = packed.tolist()  # the step's sync
            step_lps = step_lps.tolist() if want_logprobs else None   # computed by then: a copy, no wait
            for b in range(rows):
                if not live[b]:
                    continue
                accept_len, emitted = packed[b][0], packed[b][1:]
                seq = seqs[slots.row_seq[b]]
                seq.forwards += 1
                for j in range(accept_len):
                    if seq.done:
                        break
                    seq.accept(emitted[j], step_lps[b][j] if step_lps else None)
                counters.add(accept_len - 1)
            stream(slots.row_seq)
        return forwards, prefill_time, prompt_lp, _speculative_stats(tree, counters)

    def _row_sampling(self, sampling: Optional[RowSampling], slots: "_Slots", prompts) -> Optional[RowSampling]:
        """The sampling of the rows a call starts with (slots' first sequences), with their history
        (`RowSampling.start_history`: their prompts' tokens, their logit biases) where the call has
        penalties or a bias."""
        if sampling is None:
            return None
        row_sampling = sampling.pick(slots.row_seq).with_history(self.model.vocab_size)
        for row, i in enumerate(slots.row_seq):
            row_sampling.start_history(row, prompts[i])
        return row_sampling

    # ------------------------------------------------------------------ continuous batching
    def _fill_free_rows(self, slots: "_Slots", prompts, seqs, sampling: Optional[RowSampling],
                        row_sampling: Optional[RowSampling], logprobs: bool, n_heads: int, prompt_lp: list, stream):
        """While prompts wait, every row whose sequence is done takes the next one: a prefill of that
        prompt alone into the row (`_prefill_row`: from the end of a prefix some row holds, if any),
        its first token chosen from it (with its own sampling, copied into the row's) and accepted,
        then stream() (which may finish it: eos, a stop string, a cancel, a limit of 1; the row then
        takes the next). A waiting prompt with
        nothing to generate is skipped, unless its log-probs were asked for. Returns ({row: (first
        token () int64, normed hidden (n_heads, D) at its last prompt position)} for the rows that
        took a prompt, the last one each, the number of prefills run)."""
        refills, prefills = {}, 0
        while slots.waiting:
            free = [row for row, i in enumerate(slots.row_seq) if seqs[i].done]
            if not free:
                break
            for row in free:
                while slots.waiting:
                    i = slots.waiting.popleft()
                    if seqs[i].done and not logprobs:
                        continue
                    last, lp = self._prefill_row(prompts, seqs, slots, prompt_lp, i, row, logprobs, n_heads)
                    _check_finite(last, 1)
                    prefills += 1
                    if lp:
                        prompt_lp[i] = lp[0]
                    slots.row_seq[row] = i
                    one = None
                    if sampling is not None:
                        row_sampling.set_row(row, sampling, i)
                        row_sampling.start_history(row, prompts[i])
                        one = row_sampling.rows(row, row + 1)
                    position = torch.tensor([len(prompts[i])], dtype=torch.int32, device=self.device)
                    first, lps = self._next_tokens(last[:, 0], one, position, logprobs)
                    if one is not None:
                        one.count(first)
                    if not seqs[i].done:
                        seqs[i].forwards += 1
                        seqs[i].accept(int(first), lps[0] if lps else None)
                    refills[row] = (first[0], last[0])
                    break
            stream(slots.row_seq)
        return refills, prefills

    def _score_prompts(self, prompts: List[List[int]], first_shares=None) -> Tuple[List[List[float]], int]:
        """The prompts' log-probs when nothing is generated (scoring, e.g. the choices of a
        multiple-choice question after one context): prefills of max_batch_size prompts at a time,
        each sharing prefixes between its rows as the first prefill does (`share_plan`; the first
        batch is generate's first rows, already in the order of its plan, first_shares). Returns
        (log-probs per prompt, prefills run)."""
        prompt_lp, batches = [], range(0, len(prompts), self.max_batch_size)
        for first in batches:
            batch = prompts[first:first + self.max_batch_size]
            order, shares = list(range(len(batch))), first_shares if first == 0 else None
            if self.share_prefixes and first:
                order, shares = share_plan(batch, True, self._forward_tokens())
            scored = self._prefill([batch[k] for k in order], want_prompt_logprobs=True, shares=shares)[1]
            prompt_lp += _in_caller_order(scored, order)
        return prompt_lp, len(batches)

    def _prefill_row(self, prompts, seqs, slots: "_Slots", prompt_lp: list, i: int, row: int, logprobs: bool,
                     n_heads: int):
        """Prefill prompts[i] alone into cache row `row` (`_prefill_rows`), from the end of the
        longest prefix some row still holds (`best_source`: the row's own finished sequence, or
        another row's, copied) when share_prefixes is on."""
        prompt, start, source_lp = prompts[i], 0, None
        if self.share_prefixes:
            held = [None if slots.parked[r] else cached_tokens(prompts[j], seqs[j].tokens, len(prompt))
                    for r, j in enumerate(slots.row_seq)]
            source, start = best_source(prompt, held, logprobs, prefer=row)
            if start:
                self.model.copy_cache_prefix(source, row, start)
                self._shared_prompt_tokens += start
                j = slots.row_seq[source]
                source_lp = [prompt_lp[j] + seqs[j].logprobs] if logprobs else None
        return self._prefill_rows([prompt], row, logprobs, n_heads, [start], source_lp)

    # ------------------------------------------------------------------ steps
    def _prefill(self, prompts: List[List[int]], want_prompt_logprobs: bool = False, n_heads: int = 1,
                 shares: Optional[List[Optional[Tuple[int, int]]]] = None):
        """The prompts (row b in cache row b) in groups of similar length, forwards over each group's
        right-padded prompts (`prefill_groups`, in chunks: `_prefill_rows`). shares (`share_plan`):
        None, or per row None (the independent rows, first, shortest first) or (source row, length):
        those rows, after the others, copy their first `length` slots from the source row and
        compute the rest (by the length left, shortest first). Returns the normed hidden
        (B, n_heads, D) of the first n_heads heads at each prompt's last position and, if asked,
        per-prompt log-probs of each prompt token given the ones before it."""
        independent = len(prompts) if shares is None else sum(share is None for share in shares)
        if shares is not None and any(share is not None for share in shares[:independent]):
            raise RuntimeError("_prefill: the rows that share a prefix must come after the others")
        last, prompt_lp = [], []
        # the independent rows from slot 0, then the sharing rows from the end of their copied prefix
        for first, end in ((0, independent), (independent, len(prompts))):
            if first == end:
                continue
            starts = [0] * (end - first) if first == 0 else [length for _, length in shares[first:end]]
            for row, start in enumerate(starts, first):
                if start:
                    self.model.copy_cache_prefix(shares[row][0], row, start)
            self._shared_prompt_tokens += sum(starts)
            prefix_lp = None
            if want_prompt_logprobs and first:
                prefix_lp = [prompt_lp[source] for source, _ in shares[first:end]]
            rest = [len(p) - s for p, s in zip(prompts[first:end], starts)]
            for a, b in prefill_groups(rest, self._forward_tokens()):
                group_last, group_lp = self._prefill_rows(prompts[first + a:first + b], first + a, want_prompt_logprobs,
                                                          n_heads, starts[a:b], prefix_lp and prefix_lp[a:b])
                last.append(group_last)
                prompt_lp += group_lp or []
        last = torch.cat(last)
        _check_finite(last, len(prompts))
        return last, (prompt_lp if want_prompt_logprobs else None)

    def _forward_tokens(self) -> int:
        """What one more prefill forward costs, in prompt tokens (PREFILL_FORWARD_TOKENS)."""
        return PREFILL_FORWARD_TOKENS.get(self.device.type, PREFILL_FORWARD_TOKENS_DEFAULT)

    def _prefill_rows(self, prompts: List[List[int]], first_row: int, want_prompt_logprobs: bool, n_heads: int,
                      starts: Optional[List[int]] = None, prefix_logprobs: Optional[List[List[float]]] = None):
        """`prompts`, right-padded, into cache rows first_row..: one forward per chunk of positions of
        at most PREFILL_CHUNK_TOKENS tokens in all, each over the rows whose prompt reaches it (see
        _prefill). starts: None, or per row the slots already holding its prompt's first tokens (a
        shared prefix): the row computes positions starts[b].. only, and with log-probs takes those
        of its tokens 1..starts[b] from prefix_logprobs[b] (the source's log-probs by position).
        The rows' lengths left to compute must run shortest first."""
        B = len(prompts)
        starts = starts or [0] * B
        rests = [p[s:] for p, s in zip(prompts, starts)]
        lengths = [len(p) for p in rests]
        T = max(lengths)
        tokens = torch.zeros((B, T), dtype=torch.long)  # 0 is a valid id; pad slots are overwritten later
        for b, p in enumerate(rests):
            tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        tokens = tokens.to(self.device)
        first_slots = torch.tensor(starts, dtype=torch.int32, device=self.device)
        # A chunk writes every row's slots start + t0 .. start + t1 - 1, padding included: with
        # shared prefixes a row of a long prefix and a short rest, padded to a longer rest beside it,
        # would write past the cache; chunks stop at the room of the rows still in them (which is at
        # least their rest, so each chunk moves on).
        room = [self.model.cache_len - s for s in starts]
        budget = PREFILL_CHUNK_TOKENS.get(self.device.type, PREFILL_CHUNK_TOKENS_DEFAULT)
        ends = torch.tensor(lengths, device=self.device) - 1   # each row's last prompt position, from its start
        last = None
        picked = torch.zeros(B, T - 1, dtype=torch.float32, device=self.device) if want_prompt_logprobs else None
        t0 = 0
        while t0 < T:
            r = bisect.bisect_right(lengths, t0)   # rows r.. still have prompt at position t0
            t1 = min(T, t0 + max(1, budget // (B - r)), min(room[r:]))
            hidden = self.model.forward_cached(tokens[r:, t0:t1], first_slots[r:] + t0,
                                               n_heads=n_heads, first_row=first_row + r)  # (B - r, t1 - t0, n_heads, D)
            self._prefill_forwards += 1
            if last is None:
                last = hidden.new_empty((B,) + hidden.shape[2:])   # (B, n_heads, D)
            done = [b for b in range(r, B) if t0 < lengths[b] <= t1]   # rows whose prompt ends in this chunk
            if done:
                rows = torch.tensor(done, device=self.device)
                last[rows] = hidden[rows - r, ends[rows] - t0]   # a gather: no view keeps the chunk alive
            if picked is not None:
                self._pick_prompt_logprobs(picked[r:], hidden[:, : min(t1, T - 1) - t0, 0], tokens[r:], t0)
            t0 = t1
        prompt_lp = None
        if picked is not None:
            picked = picked.tolist()
            prompt_lp = [[0.0] + (prefix_logprobs[b][1:s + 1] if s else []) + picked[b][: n - 1]
                         for b, (s, n) in enumerate(zip(starts, lengths))]
        return last, prompt_lp

    def _pick_prompt_logprobs(self, picked: torch.Tensor, hidden: torch.Tensor, tokens: torch.Tensor, t0: int) -> None:
        """picked[:, t0 + j] = log-prob of tokens[:, t0 + j + 1] given head 0's normed hidden[:, j] (R, n, D),
        the float32 log-softmax a few positions at a time: (R, n, V) would not fit."""
        R, n = hidden.shape[:2]
        step = max(1, PROMPT_LOGPROB_BYTES // (4 * max(R, 1) * self.model.vocab_size))
        for j0 in range(0, n, step):
            j1 = min(n, j0 + step)
            logp = torch.log_softmax(self._logits(hidden[:, j0:j1]), dim=-1)   # (R, j1 - j0, V)
            target = tokens[:, t0 + j0 + 1:t0 + j1 + 1, None]
            picked[:, t0 + j0:t0 + j1] = logp.gather(-1, target).squeeze(-1)

    def _next_tokens(self, hidden: torch.Tensor, sampling: Optional[RowSampling], positions, logprobs: bool):
        """(R,) next tokens from head 0's normed hidden (R, D) (`_choose`, positions (R,) those of the
        new tokens), and their log-probs (a list) if asked."""
        tokens = self._choose(hidden[:, None], sampling and sampling.head(hidden.shape[0]), positions[:, None])[:, 0]
        return tokens, (token_logprobs(self._logits(hidden), tokens).tolist() if logprobs else None)

    def _choose(self, hidden0: torch.Tensor, sampling: Optional[RowSampling], positions: torch.Tensor,
                node_paths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Head 0's token at every node, (R, T) int64, from its normed hidden (R, T, D): the verifier's
        own selection (`verify_tokens`: linear_argmax, or linear_sample with each row's sampling,
        keyed by its seed and positions (R, T), the positions of the tokens drawn; with penalties,
        node_paths (R, T, L) each node's drafts below the root, `tree_paths`, or None for T = 1).
        No logits written for it without a nucleus, cut or penalty (with one, float32 logits for
        chunks of rows: `linear_sample`), and plain and speculative decoding choose from the same
        float32 scores, so a bf16 near-tie cannot split their greedy tokens nor rounding their
        sampling distributions."""
        return verify_tokens(hidden0, self.model.output.weight, sampling, positions, node_paths)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits (..., V) of normed hidden (..., D), accumulated in float32 as the selection
        kernels score (`linear_logits`): for log-probs only."""
        weight = self.model.output.weight
        return linear_logits(hidden.reshape(-1, hidden.shape[-1]), weight).view(*hidden.shape[:-1], weight.shape[0])

    def _forward(self, tokens: torch.Tensor, cache_seqlens: torch.Tensor, tree: Optional[TokenTree]) -> torch.Tensor:
        """forward_cached over (R, T) new tokens at slots cache_seqlens (R,): a plain decode step (tree
        None, one head) or a verify step over `tree` (its depths and mask, all its heads), inside the
        step functions (`_plain_step`, `_verify_step`). Returns hidden (R, T, n_heads, D)."""
        depths, mask, n_heads = (None, None, 1) if tree is None else (tree.depths, tree.packed_mask, tree.heads)
        # The lengths are kept in range on the host (limit and room): no range check (host sync).
        return self.model.forward_cached(tokens, cache_seqlens, node_depths=depths, tree_mask=mask,
                                         n_heads=n_heads, check_lengths=False)

    def _verify_step(self, root, drafts, cache_seqlens, live_mask, tree: TokenTree, sampling: Optional[RowSampling],
                     want_logprobs: bool):
        """One verify step for R rows: root (R,) and drafts (R, heads - 1, top_k) build the tree's
        candidates; one forward over them; head 0's verifier token at every node; tree_accept;
        compaction of the accepted nodes' K/V (rows with live_mask (R,) False compact nothing), which
        advances cache_seqlens (R,) int32 in place; the next drafts from the heads at each row's last
        accepted node. Returns (packed (R, 1 + W) int64 on the device: accept_len, then the emitted
        tokens, -1 padded; next root (R,); next drafts; the emitted tokens' log-probs (R, W) float32
        on the device, from head 0's logits at the accepted nodes, or None). A step, greedy or sampled,
        with or without log-probs, is one CUDA graph when graphs are on: no launch from Python inside
        it (the rows' sampling tensors, seeds keying the noise with the nodes' positions, are inputs)."""
        weight = self.model.output.weight
        T, heads, top_k = tree.size, tree.heads, tree.top_k

        def step(root, drafts, cache_seqlens, live_mask, *sampled):
            candidates = build_candidates(root, drafts, tree)                              # (R, T)
            hidden = self._forward(candidates, cache_seqlens, tree)                        # (R, T, heads, D)
            one_read = self._one_read and not sampled
            if one_read:   # every head at every node scored in the verifier's read
                verifier, scored = verify_and_score(hidden, weight, top_k)
            else:
                # Node t of row r draws the token at position cache_seqlens[r] + depth[t] + 1.
                positions = cache_seqlens[:, None] + tree.depths[None, :] + 1
                step_sampling = sampling.from_tensors(sampled) if sampled else None
                paths = tree_paths(candidates, tree) if step_sampling and step_sampling.penalties is not None else None
                verifier = self._choose(hidden[:, :, 0], step_sampling, positions, paths)
            outcome = accept_step(candidates, verifier, tree)
            compact_kv_cache(self.model.k_cache, self.model.v_cache, cache_seqlens, outcome.accepted_nodes,
                             torch.where(live_mask, outcome.accept_len, 0))
            row_ids = torch.arange(root.shape[0], device=root.device)
            if one_read:
                next_drafts = drafts_from_scores(scored, outcome.last_node, T, heads, top_k)
            else:
                next_drafts = draft_tokens(hidden[row_ids, outcome.last_node, 1:], weight, top_k)
            outputs = (outcome.packed, outcome.next_root, next_drafts, cache_seqlens)   # the advanced lengths
            if want_logprobs:   # the emitted tokens' log-probs under head 0 at the accepted nodes
                node_logits = self._logits(hidden[row_ids[:, None], outcome.accepted_nodes.clamp(min=0), 0])
                outputs += (torch.log_softmax(node_logits, dim=-1).gather(
                    -1, outcome.emitted.clamp(min=0)[..., None]).squeeze(-1),)
            return outputs

        inputs = (root, drafts, cache_seqlens, live_mask)
        if sampling is not None and sampling.penalties is not None:
            tree.draft_path_nodes   # built here, eagerly, not inside a capture
        key = ("verify", T, heads, top_k, tree.packed_mask.words.data_ptr(), self.shared_unembed)
        if sampling is not None:
            key, inputs = key + sampling.graph_key, inputs + sampling.tensors()
        key += ("logprobs",) if want_logprobs else ()
        self._one_read = bool(self.shared_unembed)   # eager steps (and a failed capture's fallback)
        rows = graph_bucket(root.shape[0], self.model.cache_batch)   # the rows a graph runs
        # A sampled step reads the unembedding twice (verifier draws, then drafts): no read variants.
        scored_rows = rows * T * heads if sampling is None else None
        packed, next_root, next_drafts, lengths, *step_lps = self._graphed(
            key, step, inputs, keep_alive=(tree,),
            variants=lambda: self._with_programmatic_launch(self._step_variants(heads, scored_rows=scored_rows)))
        cache_seqlens.copy_(lengths)  # the graph advanced its own copy (eagerly: the same tensor)
        return packed, next_root, next_drafts, step_lps[0] if want_logprobs else None

    def _step_variants(self, heads: int, scored_rows: Optional[int] = None) -> dict:
        """The ways a verify step may be captured (CUDAGraphSteps variants): its head blocks as
        concurrent graph branches or in order (where there are several and concurrency is on),
        times, for a greedy step of scored_rows = rows x nodes x heads, one or two reads of the
        unembedding (shared_unembed, or both where it is None and scored_rows is at most
        speculative.ONE_READ_MAX_ROWS; scored_rows None: a sampled step, which reads it twice).
        Label -> a context that sets the switches while the step is traced."""
        model = self.model
        # In order first: CUDAGraphSteps checks every variant against the first listed.
        concurrency = (False, True) if heads > 1 and model.concurrent_heads else (model.concurrent_heads,)
        if scored_rows is None:
            one_read = (None,)   # a sampled step: the verifier's draws, then the drafts
        elif self.shared_unembed is None:
            one_read = (True, False) if scored_rows <= ONE_READ_MAX_ROWS else (False,)
        else:
            one_read = (self.shared_unembed,)

        @contextlib.contextmanager
        def setting(concurrent: bool, read_once: Optional[bool]):
            before = model.concurrent_heads, self._one_read
            model.concurrent_heads = concurrent
            if read_once is not None:
                self._one_read = read_once
            try:
                yield
            finally:
                model.concurrent_heads, self._one_read = before

        def label(concurrent: bool, read_once: Optional[bool]) -> str:
            heads_way = "concurrent" if concurrent else "in order"
            return heads_way if read_once is None else f"{heads_way}, {'one read' if read_once else 'two reads'}"

        return {label(c, r): functools.partial(setting, c, r) for c in concurrency for r in one_read}

    def _with_programmatic_launch(self, variants: Optional[dict]) -> Optional[dict]:
        """A step's capture variants (label -> context; None: one way), each also with the step's
        Triton kernels launched programmatically (kernels/dependent_launch.py: a kernel starts while
        the one before it ends) where the device supports it, listed after the ordinary ones (a tie
        keeps those). Unchanged elsewhere."""
        if not dependent_launch.programmatic_supported(self.model.output.weight.device):
            return variants
        base = variants or {"ordinary launches": contextlib.nullcontext}

        @contextlib.contextmanager
        def programmatic(setting):
            with setting(), dependent_launch.programmatic_launch():
                yield

        return {**base, **{(f"{label}, programmatic launch" if variants else "programmatic launch"):
                           functools.partial(programmatic, setting) for label, setting in base.items()}}

    def _graphed(self, key: tuple, fn, inputs: tuple, keep_alive: tuple = (), variants=None):
        """fn(*inputs) -> tuple of per-row tensors: replayed from a CUDA graph (CUDAGraphSteps) when
        graphs are on, else (or after a failed capture) called. variants: a function returning
        CUDAGraphSteps' variants, called only to capture; an eager call runs fn as the switches stand."""
        if self._use_cuda_graphs():
            if self._graphs is None:
                self._graphs = CUDAGraphSteps(self.model)
            try:
                return self._graphs(key, fn, inputs, keep_alive, variants)
            except (RuntimeError, TritonError) as err:   # TritonError: a kernel first compiled in a capture
                if self.cuda_graphs:  # asked for explicitly: do not hide the failure
                    raise
                # Graphs are only a speed-up: a capture that fails (an op that cannot be captured,
                # e.g. under MTP_BACKEND=reference) leaves this Generator eager, with a warning.
                warnings.warn(f"CUDA graph capture failed, generating eagerly from now on: {err}")
                self.cuda_graphs, self._graphs = False, None
        return fn(*inputs)

    def _use_cuda_graphs(self) -> bool:
        on_cuda = self.device.type == "cuda"
        if self.cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs=True needs a model on CUDA, but it is on {self.device}")
        return on_cuda if self.cuda_graphs is None else self.cuda_graphs

    # ------------------------------------------------------------------ checks
    def _check_speculative(self, speculative, heads, tree, rows: int) -> Optional[TokenTree]:
        """The token tree of a speculative call over `rows` prompts (None for plain decoding);
        ValueError on bad arguments."""
        if speculative is None:
            if heads is not None or tree is not None:
                raise ValueError("heads and tree only apply to self-speculative decoding (speculative='chain'|'tree')")
            return None
        if speculative not in SPECULATIVE_MODES:
            raise ValueError(f"speculative must be None or one of {SPECULATIVE_MODES}, got {speculative!r}")
        n_future = self.model.n_future_tokens
        if n_future < 2:
            raise ValueError("self-speculative decoding needs a model with extra heads to draft; this one has "
                             "n_future_tokens=1")
        asked_heads, heads = heads, n_future if heads is None else heads
        if isinstance(heads, bool) or not isinstance(heads, int) or not 2 <= heads <= n_future:
            raise ValueError(f"heads must be an int in [2, {n_future}] (head 0 verifies, heads 1.. draft; the model "
                             f"has {n_future}), got {heads!r}")
        if speculative == "chain":
            if tree is not None:
                raise ValueError("tree= applies to speculative='tree'; speculative='chain' drafts top-1 per head")
            tree = "chain"
        default = tree is None
        if default:
            tree_tokens = self.tree_tokens or DEFAULT_TREE_TOKENS.get(self.device.type, DEFAULT_TREE_TOKENS["cuda"])
            # Sized for the batch bucket the CUDA graphs run (rows rounded up to a power of two), so
            # every batch size in a bucket verifies the same tree: one set of graphs and tunings.
            tree = default_tree(heads, next_power_of_two(rows), tree_tokens, self.tree_rates,
                                vocab_size=self.model.vocab_size)
        token_tree = speculative_tree(tree, heads)
        if token_tree.max_depth + 1 < heads:
            # A head no node reaches would run in every verify forward and draft for nothing.
            if asked_heads is not None and default:
                warnings.warn(f"heads={heads}: the default tree for {rows} row(s) ({len(token_tree.paths)} nodes, "
                              f"depth {token_tree.max_depth}) drafts with {token_tree.max_depth + 1} heads, which its "
                              "rates say pays more than depth at that size; pass speculative='chain' or a deeper tree= "
                              f"to draft with all {heads}", stacklevel=3)
            token_tree = speculative_tree(tree, token_tree.max_depth + 1)
        if token_tree.top_k > self.model.vocab_size:
            raise ValueError(f"tree uses rank {token_tree.top_k - 1}, but the vocabulary has only "
                             f"{self.model.vocab_size} tokens")
        return token_tree

    def _ensure_caches(self, tree_size: int = 1) -> None:
        """The cache holds max_seq_len tokens and, once a speculative call has asked, tree_size - 1
        more slots: a live row has at most max_seq_len - 2 tokens cached, so a verify step's whole
        tree always fits. (A tree cut to the room left would be a new shape per step near the end:
        eager, or a new graph and kernel tunings each time.)"""
        self._cache_len = max(self._cache_len, self.max_seq_len + tree_size - 1)
        # Another Generator on the same model may have re-sized its caches since construction.
        if self.model.cache_batch != self.max_batch_size or self.model.cache_len != self._cache_len:
            with torch.inference_mode(False):  # normal tensors: the model's own forwards write them too
                self.model.setup_caches(self.max_batch_size, self._cache_len)

    def _check_stop(self, stop, n: int) -> List[Tuple[str, ...]]:
        """generate's stop as a tuple of non-empty strings per prompt; ValueError naming what is wrong."""
        def strings(value, label):
            if value is None:
                return ()
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{label} must be a non-empty str or a list of them, got {value!r}")
            return tuple(value)
        stops = per_prompt_lists(stop, n, "stop", strings)
        if any(stops) and self.tokenizer is None:
            raise ValueError("stop strings need the Generator's tokenizer (Generator(model, tokenizer, ...)) "
                             "to read the text")
        return stops

    def _check_stop_token_ids(self, stop_token_ids, n: int) -> List[FrozenSet[int]]:
        """generate's stop_token_ids as a set of token ids per prompt; ValueError naming what is wrong."""
        vocab = self.model.vocab_size

        def ids(value, label):
            if value is None:
                return frozenset()
            if not isinstance(value, (list, tuple, set, frozenset)):
                raise ValueError(f"{label} must be a list of int token ids, got {value!r}")
            out = set()
            for token in value:
                token = integer(token)
                if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                    raise ValueError(f"{label}: {token!r} is not a token id of this model (an int in [0, {vocab}))")
                out.add(token)
            return frozenset(out)
        return per_prompt_lists(stop_token_ids, n, "stop_token_ids", ids)

    def _resolve_eos(self, eos_id: Optional[int], label: str = "eos_id") -> Optional[int]:
        if eos_id is None and self.tokenizer is not None:
            eos_id = self.tokenizer.eos_id
        if eos_id is None:
            return None
        eos_id = integer(eos_id)
        if isinstance(eos_id, bool) or not isinstance(eos_id, int):
            raise ValueError(f"{label} must be an int token id or None, got {eos_id!r}")
        vocab = self.model.vocab_size
        if eos_id >= vocab:
            raise ValueError(f"{label} {eos_id} is not a token id of this model (vocab_size {vocab}); "
                             "a negative id means never stop early (None: the tokenizer's eos)")
        return eos_id if eos_id >= 0 else None

    def _check_prompts(self, prompt_tokens) -> List[List[int]]:
        """The prompts as lists of ints; ValueError naming the prompt otherwise. A prompt may fill
        max_seq_len, as the release allows: it then generates nothing (finish reason "max_seq_len")
        while the rest of the batch goes on."""
        if isinstance(prompt_tokens, (str, bytes)) or not isinstance(prompt_tokens, Sequence):
            raise ValueError("prompt_tokens must be a list of token-id lists, "
                             f"got {type(prompt_tokens).__name__}")
        if len(prompt_tokens) == 0:
            raise ValueError("prompt_tokens is empty: give at least one prompt")
        vocab = self.model.vocab_size
        prompts = []
        for b, prompt in enumerate(prompt_tokens):
            if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
                raise ValueError(f"prompt {b} must be a list of token ids, got {type(prompt).__name__}")
            if len(prompt) == 0:
                raise ValueError(f"prompt {b} is empty: every prompt needs at least one token (e.g. bos)")
            if len(prompt) > self.max_seq_len:
                raise ValueError(f"prompt {b} has {len(prompt)} tokens, more than max_seq_len {self.max_seq_len}")
            try:
                if any(isinstance(t, bool) for t in prompt):
                    raise TypeError
                ids = [operator.index(t) for t in prompt]
            except TypeError:
                raise ValueError(f"prompt {b} contains a non-integer token id (bools are not ids)") from None
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {b} has token id {bad[0]} outside the vocabulary [0, {vocab})")
            prompts.append(ids)
        return prompts


# ---------------------------------------------------------------------- speculative statistics
@dataclass
class SpeculativeCounters:
    """Per (sequence, verify step) counts: steps, and accepted[d-1] = steps that accepted a draft at
    depth d (what the verifier accepted, before eos or the length limit cut the emitted tokens). Every
    step verifies the whole tree, so every step drafts every depth."""

    max_depth: int
    steps: int = 0
    accepted: List[int] = field(default_factory=list)

    def __post_init__(self):
        self.accepted = [0] * self.max_depth

    def add(self, accepted_depth: int) -> None:
        self.steps += 1
        for d in range(accepted_depth):
            self.accepted[d] += 1


def _speculative_stats(tree: TokenTree, counters: SpeculativeCounters) -> dict:
    """heads, tree_nodes (T, root included), verify_steps (sequence-steps), mean_accepted_drafts per
    verify step, acceptance_per_depth[d-1] = accepted at depth d / verify steps (None before any
    step), and acceptance_per_head {"head_d": same}: head d drafts depth d."""
    per_depth = [a / counters.steps if counters.steps else None for a in counters.accepted]
    return {
        "heads": tree.heads,
        "tree_nodes": tree.size,
        "verify_steps": counters.steps,
        "mean_accepted_drafts": sum(counters.accepted) / counters.steps if counters.steps else 0.0,
        "acceptance_per_depth": per_depth,
        "acceptance_per_head": {f"head_{d}": rate for d, rate in enumerate(per_depth, start=1)},
    }


def _check_finite(last: torch.Tensor, prompts: int) -> None:
    """One check (a host sync) per prefill: NaN or inf in the prompts' last hidden states (B, n_heads,
    D) would come out as token 0 and NaN log-probs."""
    finite = torch.isfinite(last).flatten(1).all(1)
    if not bool(finite.all()):
        raise ValueError(f"the model's hidden state at the end of {int((~finite).sum())} of {prompts} "
                         "prompt(s) is not finite (NaN or inf: broken weights, or an fp16 overflow): its "
                         "tokens would mean nothing")


class _Slots:
    """Continuous batching: which sequence (an index into generate's seqs, shortest prompt first)
    each cache row holds. The first `rows` (at most max_batch_size) start in rows 0..rows-1; the
    rest wait, in order, for a row whose sequence is done (`Generator._fill_free_rows`)."""

    def __init__(self, n: int, max_batch_size: int):
        self.n, self.rows = n, min(n, max_batch_size)
        self.row_seq = list(range(self.rows))
        self.waiting = collections.deque(range(self.rows, n))
        self.live: Tuple[bool, ...] = ()
        self.parked = [False] * self.rows

    def live_rows(self, seqs: List[SequenceState], cache_seqlens: torch.Tensor, prompts, refills: dict) -> int:
        """Before a step: the rows a forward must run, 0 when every sequence is done; `live` then
        says which of the rows hold a sequence still generating. A row that took a prompt
        (`refills`) starts at that prompt's length. A done row is parked at cache length 0: inside
        the forward (rows past the last live one leave it: the cache is indexed by leading rows) it
        re-writes slot 0 of its own cache, which nothing reads, and attends to nothing; a done row
        left at its length would read its whole cache every step, and one that took a prompt of
        max_seq_len tokens (for its log-probs alone) would write past the cache."""
        for row in refills:
            cache_seqlens[row], self.parked[row] = len(prompts[self.row_seq[row]]), False
        self.live = tuple(not seqs[i].done for i in self.row_seq)
        park = [row for row, alive in enumerate(self.live) if not alive and not self.parked[row]]
        if park:
            cache_seqlens[torch.tensor(park, device=cache_seqlens.device)] = 0
            for row in park:
                self.parked[row] = True
        return max((row + 1 for row, alive in enumerate(self.live) if alive), default=0)

    def all_prompt_logprobs(self, first: Optional[list]) -> Optional[list]:
        """The first rows' prompt log-probs, as a list over every sequence (the others filled as they
        take a row), or None when none were asked for."""
        return None if first is None else first + [None] * (self.n - self.rows)


def _check_on_tokens(on_tokens, logprobs: bool) -> None:
    """generate's on_tokens: None, or a function that takes (index, new_tokens, finish), and the
    new tokens' log-probs after those with logprobs=True; checked before any forward runs."""
    if on_tokens is None:
        return
    arguments = "(index, new_tokens, finish, new_logprobs)" if logprobs else "(index, new_tokens, finish)"
    if not callable(on_tokens):
        raise ValueError(f"on_tokens must be a function {arguments} or None, got {on_tokens!r}")
    try:
        signature = inspect.signature(on_tokens)
    except (TypeError, ValueError):   # some builtins have none to read: their first call will tell
        return
    if not _binds(signature, 4 if logprobs else 3):
        more = ""
        if logprobs:
            more = " (generate(logprobs=True) hands over the new tokens' log-probs too)"
        elif _binds(signature, 4):
            more = " (a fourth argument, the new tokens' log-probs, comes only with generate(logprobs=True))"
        raise ValueError(f"on_tokens{signature} cannot be called as on_tokens{arguments}{more}")


def _binds(signature: inspect.Signature, n: int) -> bool:
    """Whether a function of this signature can be called with n positional arguments."""
    try:
        signature.bind(*range(n))
        return True
    except TypeError:
        return False


def _hand_over(seqs: List[SequenceState], visit: Sequence[int], order: List[int], on_tokens, logprobs: bool) -> None:
    """generate's on_tokens for each sequence seqs[i], i in `visit` (seqs in length order; order[i]
    is its caller's index), with tokens it has not handed over yet or a finish it has not told, in
    the caller's order (with the new tokens' log-probs when logprobs); a sequence it returns True
    for is cancelled."""
    for i in sorted(visit, key=order.__getitem__):
        seq = seqs[i]
        new = seq.tokens[seq.streamed:]
        if new or (seq.done and not seq.told_finish):
            seq.streamed = len(seq.tokens)
            seq.told_finish = seq.done
            extra = (seq.logprobs[len(seq.tokens) - len(new):],) if logprobs else ()
            if on_tokens(order[i], new, seq.finish, *extra) is True and not seq.done:
                seq.finish, seq.told_finish = "cancelled", True


def per_prompt_lists(value, n: int, name: str, convert) -> list:
    """An argument whose value is itself a list (stop strings, stop token ids) for n prompts: one
    value for every prompt, or a list with one entry (a list, or None) per prompt, told apart by
    entries that are lists or None. convert(entry, label) checks and converts one entry."""
    if isinstance(value, (list, tuple)) and any(v is None or isinstance(v, (list, tuple, set, frozenset))
                                                for v in value):
        if len(value) != n:
            raise ValueError(f"{name}: a list of lists needs one entry per prompt, got {len(value)} for {n} prompt(s)")
        return [convert(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return [convert(value, name)] * n


def _in_caller_order(items: list, order: List[int]) -> list:
    """items[k] belongs to the caller's row order[k]: the list in the caller's row order."""
    out = [None] * len(items)
    for k, b in enumerate(order):
        out[b] = items[k]
    return out


def integer(value):
    """value as a Python int when it is an integer (numpy's included), else value unchanged; bools
    stay bools, which the callers' checks refuse."""
    if isinstance(value, bool):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value

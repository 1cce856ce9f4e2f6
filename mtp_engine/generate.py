"""Batched autoregressive generation on the static KV cache, and the release-style `Llama` front end.

Every sequence keeps its own cache length (`cache_seqlens[b]`, per-sequence rotary positions):
prompts are right-padded for a single prefill forward, never left-padded. A real prompt position
only attends causally to earlier real ones, and a pad slot is overwritten by the sequence's next
token before anything reads it, so padding changes no result: batched output equals
one-prompt-at-a-time output token for token.

Per-sequence state (`SequenceState`) is explicit so that self-speculative decoding, which accepts
a different number of tokens per sequence and step, can reuse the same bookkeeping.
"""
from __future__ import annotations

import operator
import os
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from .model import Transformer
from .sampling import check_sampling_args, sample_next, token_logprobs

SPECULATIVE_MODES = ("chain", "tree")


@dataclass
class GenerationResult:
    """tokens[b]: generated ids of prompt b (eos excluded); text[b]: their decoding (None without a tokenizer).

    finish_reasons[b]: "eos", "max_gen_len", or "max_seq_len" (the cache was full).
    logprobs[b] / prompt_logprobs[b]: only when generate(logprobs=True); prompt_logprobs[b][0] is 0.0
    (the first prompt token has no context), as in the Llama release.
    stats: batch_size, prompt_tokens, generated_tokens, forwards (model calls), tokens_per_forward
    (tokens produced per sequence per forward it took part in, eos included: 1.0 for plain decoding),
    prefill_time_s, wall_time_s, tokens_per_s.
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
    tokens: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    produced: int = 0   # tokens produced, eos included
    forwards: int = 0   # forwards that produced tokens for this sequence
    finish: Optional[str] = None

    @property
    def done(self) -> bool:
        return self.finish is not None

    def accept(self, token: int, eos_id: Optional[int], logprob: Optional[float] = None) -> None:
        """Append one produced token; finish on eos (not kept) or when the limit is reached."""
        self.produced += 1
        if eos_id is not None and token == eos_id:
            self.finish = "eos"
            return
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if len(self.tokens) >= self.limit:
            self.finish = "max_gen_len" if self.limit_is_gen_len else "max_seq_len"


class Generator:
    """Plain (and later self-speculative) batched generation with a Transformer's static KV cache.

    Construction allocates the cache: model.setup_caches(max_batch_size, max_seq_len).
    """

    def __init__(self, model: Transformer, tokenizer=None, max_batch_size: int = 8, max_seq_len: int = 2048):
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        model.setup_caches(max_batch_size, max_seq_len)

    @property
    def device(self) -> torch.device:
        return self.model.output.weight.device

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def generate(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, speculative: Optional[str] = None, heads=None, tree=None,
                 seed: Optional[int] = None, eos_id: Optional[int] = None, logprobs: bool = False) -> GenerationResult:
        """Continue every prompt; prompts may differ in length.

        prompt_tokens: list of token-id lists. max_gen_len: most new tokens per prompt, clipped per
        prompt to the room left in the cache (max_seq_len - len(prompt)). temperature 0 is greedy;
        otherwise softmax(logits / temperature) restricted to the top_p nucleus, drawn with a
        torch.Generator seeded by `seed` (None: torch's global RNG). eos_id: defaults to the
        tokenizer's; None or negative means never stop early.
        """
        if speculative is not None:
            if speculative not in SPECULATIVE_MODES:
                raise ValueError(f"speculative must be None or one of {SPECULATIVE_MODES}, got {speculative!r}")
            raise NotImplementedError("self-speculative decoding arrives with the speculative issue")
        if heads is not None or tree is not None:
            raise ValueError("heads and tree only apply to self-speculative decoding (speculative='chain'|'tree')")
        check_sampling_args(temperature, top_p)
        if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int) or max_gen_len < 0:
            raise ValueError(f"max_gen_len must be an int >= 0, got {max_gen_len!r}")
        prompts = self._check_prompts(prompt_tokens)
        eos_id = self._resolve_eos(eos_id)
        self._ensure_caches()

        seqs = []
        for p in prompts:
            room = self.max_seq_len - len(p)
            seq = SequenceState(prompt=p, limit=min(max_gen_len, room), limit_is_gen_len=max_gen_len <= room)
            if seq.limit == 0:
                seq.finish = "max_gen_len"
            seqs.append(seq)

        rng = None
        if temperature > 0 and seed is not None:
            rng = torch.Generator(device=self.device)
            rng.manual_seed(int(seed))

        start = time.perf_counter()
        forwards, prefill_time = 0, 0.0
        prompt_lp = None
        if not all(s.done for s in seqs):
            logits, prompt_lp = self._prefill(prompts, logprobs)
            forwards += 1
            prefill_time = time.perf_counter() - start
            cache_seqlens = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=self.device)
            while True:
                next_tok = sample_next(logits, temperature, top_p, rng)
                lps = token_logprobs(logits, next_tok).tolist() if logprobs else None
                for b, tok in enumerate(next_tok.tolist()):
                    if not seqs[b].done:
                        seqs[b].forwards += 1
                        seqs[b].accept(tok, eos_id, lps[b] if lps else None)
                live = [not s.done for s in seqs]
                if not any(live):
                    break
                # Rows past the last live one leave the forward (the cache is indexed by leading rows);
                # finished rows inside it re-write their first free slot, which nothing reads.
                rows = max(b for b, alive in enumerate(live) if alive) + 1
                logits = self._decode(next_tok[:rows], cache_seqlens[:rows])
                forwards += 1
                cache_seqlens[:rows] += torch.tensor(live[:rows], dtype=torch.int32, device=self.device)
        wall = time.perf_counter() - start

        tokens = [s.tokens for s in seqs]
        generated = sum(len(t) for t in tokens)
        seq_forwards = sum(s.forwards for s in seqs)
        stats = {
            "batch_size": len(seqs),
            "prompt_tokens": sum(len(p) for p in prompts),
            "generated_tokens": generated,
            "forwards": forwards,
            "tokens_per_forward": (sum(s.produced for s in seqs) / seq_forwards) if seq_forwards else 0.0,
            "prefill_time_s": prefill_time,
            "wall_time_s": wall,
            "tokens_per_s": generated / wall if wall > 0 else 0.0,
        }
        text = [self.tokenizer.decode(t) for t in tokens] if self.tokenizer is not None else None
        return GenerationResult(
            tokens=tokens, text=text, stats=stats, finish_reasons=[s.finish for s in seqs],
            logprobs=[s.logprobs for s in seqs] if logprobs else None,
            prompt_logprobs=prompt_lp)

    # ------------------------------------------------------------------ steps
    def _prefill(self, prompts: List[List[int]], want_prompt_logprobs: bool = False, n_heads: int = 1):
        """One forward over the right-padded batch. Returns last-position logits (B, V) float32 of head 0
        and, if asked, per-prompt log-probs of each prompt token given the ones before it."""
        B, T = len(prompts), max(len(p) for p in prompts)
        tokens = torch.zeros((B, T), dtype=torch.long)  # 0 is a valid id; pad slots are overwritten later
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        tokens = tokens.to(self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        hidden = self.model.forward_cached(tokens, torch.zeros(B, dtype=torch.int32, device=self.device),
                                           n_heads=n_heads)  # (B, T, n_heads, D)
        last = hidden[torch.arange(B, device=self.device), lengths - 1, 0]  # (B, D)
        logits = self.model.output(last).float()
        prompt_lp = None
        if want_prompt_logprobs:
            all_logp = torch.log_softmax(self.model.output(hidden[:, :-1, 0]).float(), dim=-1)  # (B, T-1, V)
            picked = all_logp.gather(-1, tokens[:, 1:, None]).squeeze(-1).tolist() if T > 1 else [[]] * B
            prompt_lp = [[0.0] + picked[b][: len(p) - 1] for b, p in enumerate(prompts)]
        return logits, prompt_lp

    def _decode(self, tokens: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
        """tokens: (R,) int64, one new token per row, written at slot cache_seqlens[r]. Returns (R, V) float32."""
        # The lengths are kept in range on the host (limit = room left), so no per-step range check (sync).
        hidden = self.model.forward_cached(tokens[:, None], cache_seqlens, n_heads=1,
                                           check_lengths=False)  # (R, 1, 1, D)
        return self.model.output(hidden[:, 0, 0]).float()

    # ------------------------------------------------------------------ checks
    def _ensure_caches(self) -> None:
        # Another Generator on the same model may have re-sized its caches since construction.
        if self.model.cache_batch != self.max_batch_size or self.model.cache_len != self.max_seq_len:
            self.model.setup_caches(self.max_batch_size, self.max_seq_len)

    def _resolve_eos(self, eos_id: Optional[int]) -> Optional[int]:
        if eos_id is None and self.tokenizer is not None:
            eos_id = self.tokenizer.eos_id
        if eos_id is None:
            return None
        eos_id = operator.index(eos_id)
        return eos_id if eos_id >= 0 else None

    def _check_prompts(self, prompt_tokens) -> List[List[int]]:
        if isinstance(prompt_tokens, (str, bytes)) or not isinstance(prompt_tokens, Sequence):
            raise ValueError("prompt_tokens must be a list of token-id lists, "
                             f"got {type(prompt_tokens).__name__}")
        if len(prompt_tokens) == 0:
            raise ValueError("prompt_tokens is empty: give at least one prompt")
        if len(prompt_tokens) > self.max_batch_size:
            raise ValueError(f"batch of {len(prompt_tokens)} prompts exceeds max_batch_size {self.max_batch_size}")
        vocab = self.model.vocab_size
        prompts = []
        for b, prompt in enumerate(prompt_tokens):
            if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
                raise ValueError(f"prompt {b} must be a list of token ids, got {type(prompt).__name__}")
            if len(prompt) == 0:
                raise ValueError(f"prompt {b} is empty: every prompt needs at least one token (e.g. bos)")
            if len(prompt) >= self.max_seq_len:
                raise ValueError(f"prompt {b} has {len(prompt)} tokens; it must be shorter than "
                                 f"max_seq_len {self.max_seq_len} to leave room for one new token")
            try:
                ids = [operator.index(t) for t in prompt]
            except TypeError:
                raise ValueError(f"prompt {b} contains a non-integer token id") from None
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {b} has token id {bad[0]} outside the vocabulary [0, {vocab})")
            prompts.append(ids)
        return prompts


# ---------------------------------------------------------------------- release-style front end
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device=None) -> torch.device:
    """None -> cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but CUDA is not available on this machine")
    return device


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None -> bfloat16 on cuda, float32 elsewhere; strings like "bfloat16" / "fp32" accepted."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


class Llama:
    """The Llama release's generation front end (generation.py), on top of `Generator`.

    `Llama.build(...).text_completion(prompts, ...)` returns [{"generation": str}, ...] exactly as
    the release's example_completion.py reads it.
    """

    @staticmethod
    def build(ckpt_dir, tokenizer_path, max_seq_len: int, max_batch_size: int, device=None, dtype=None,
              seed: int = 1) -> "Llama":
        from .checkpoint import load_checkpoint
        from .tokenizer import Tokenizer

        if not os.path.isdir(ckpt_dir):
            raise FileNotFoundError(f"checkpoint directory {str(ckpt_dir)!r} does not exist")
        if not os.path.isfile(tokenizer_path):
            raise FileNotFoundError(f"tokenizer file {str(tokenizer_path)!r} does not exist")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        torch.manual_seed(seed)  # the release seeds once here; sampling with seed=None draws from it
        tokenizer = Tokenizer(str(tokenizer_path))
        model = load_checkpoint(ckpt_dir, device=device, dtype=dtype, max_seq_len=max_seq_len,
                                max_batch_size=max_batch_size)
        if model.vocab_size != tokenizer.n_words:
            raise ValueError(f"checkpoint vocab_size {model.vocab_size} does not match the tokenizer's "
                             f"{tokenizer.n_words} words ({tokenizer_path}): wrong tokenizer for this model?")
        model.eval()
        return Llama(model, tokenizer, max_seq_len=max_seq_len, max_batch_size=max_batch_size)

    def __init__(self, model: Transformer, tokenizer, max_seq_len: Optional[int] = None,
                 max_batch_size: Optional[int] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len or model.params.max_seq_len
        self.generator = Generator(model, tokenizer, max_batch_size=max_batch_size or model.params.max_batch_size,
                                   max_seq_len=self.max_seq_len)
        self.last_stats: Optional[dict] = None

    def generate(self, prompt_tokens: List[List[int]], max_gen_len: int, temperature: float = 0.6,
                 top_p: float = 0.9, logprobs: bool = False, echo: bool = False):
        """The release's Llama.generate: (token lists, logprob lists or None); echo prefixes the prompt."""
        res = self.generator.generate(prompt_tokens, max_gen_len=max_gen_len, temperature=temperature,
                                      top_p=top_p, logprobs=logprobs)
        self.last_stats = res.stats
        out_tokens, out_logprobs = [], []
        for b, prompt in enumerate(prompt_tokens):
            toks = (list(prompt) if echo else []) + res.tokens[b]
            out_tokens.append(toks)
            if logprobs:
                out_logprobs.append((res.prompt_logprobs[b] if echo else []) + res.logprobs[b])
        return out_tokens, (out_logprobs if logprobs else None)

    def text_completion(self, prompts: List[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False, echo: bool = False) -> List[dict]:
        """[{"generation": str}] per prompt (plus "tokens" and "logprobs" when logprobs=True)."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, got a single str")
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
        if logprobs:
            return [{"generation": self.tokenizer.decode(t),
                     "tokens": [self.tokenizer.decode([x]) for x in t],
                     "logprobs": lp} for t, lp in zip(tokens, lps)]
        return [{"generation": self.tokenizer.decode(t)} for t in tokens]

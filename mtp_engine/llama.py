"""The Llama release's generation front end (`Llama`: build, generate, text_completion) on top of
`Generator`, and what it reads besides the checkpoint: a dtype by name, a tree.json's acceptance rates."""
from __future__ import annotations

import json
import os
from typing import List, Optional

import torch

from .checkpoint import resolve_device
from .generate import GenerationResult, Generator
from .model import Transformer
from .speculative import check_rates


def _check_seed(seed) -> None:
    """A torch.Generator seed: an int in [0, 2**63) (torch rejects larger ones from deep inside)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None -> bfloat16 on cuda, float32 elsewhere; strings like "bfloat16" / "fp32" accepted."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def read_tree_rates(ckpt_dir, heads: Optional[int] = None) -> Optional[List[List[float]]]:
    """The measured acceptance rates in a checkpoint's tree.json (written by `mtp eval --build-tree`),
    which the default tree is then built from; None when the file is absent. heads: the model's
    heads, whose drafting depths (heads - 1) the rates must cover."""
    path = os.path.join(ckpt_dir, "tree.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            rates = check_rates(json.load(f)["rates"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a tree file with per-depth acceptance \"rates\" ({err})") from None
    if heads is not None and len(rates) < heads - 1:
        raise ValueError(f"{path}: rates cover {len(rates)} drafting depths, but the model's {heads} heads "
                         f"need {heads - 1} (rebuild it with `mtp eval --build-tree`)")
    return rates


class Llama:
    """The Llama release's generation front end (generation.py), on top of `Generator`.

    `Llama.build(...).text_completion(prompts, ...)` returns [{"generation": str}, ...] exactly as
    the release's example_completion.py reads it. `build` takes the release's arguments in the
    release's order (ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, model_parallel_size,
    seed); device and dtype, which the release does not have, are keywords.
    """

    @staticmethod
    def build(ckpt_dir, tokenizer_path, max_seq_len: int, max_batch_size: int,
              model_parallel_size: Optional[int] = None, seed: int = 1, *, device=None, dtype=None) -> "Llama":
        from .checkpoint import load_checkpoint
        from .tokenizer import Tokenizer

        _check_seed(seed)
        if model_parallel_size not in (None, 1):   # the release's keyword: here one process holds the model
            raise ValueError(f"model_parallel_size={model_parallel_size!r}: Llama.build runs the whole model in "
                             "this process; for tensor parallelism over N GPUs run `torchrun --nproc_per_node N "
                             "-m mtp_engine.tensor_parallel` (any shard count loads either way)")
        for name, value in (("ckpt_dir", ckpt_dir), ("tokenizer_path", tokenizer_path)):
            if not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{name} must be a path, got {value!r}")
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
        tokenizer.check_vocab(model.vocab_size)
        model.eval()
        return Llama(model, tokenizer, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                     tree_rates=read_tree_rates(ckpt_dir, model.n_future_tokens))

    def __init__(self, model: Transformer, tokenizer, max_seq_len: Optional[int] = None,
                 max_batch_size: Optional[int] = None, tree_rates=None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len or model.params.max_seq_len
        self.generator = Generator(model, tokenizer, max_batch_size=max_batch_size or model.params.max_batch_size,
                                   max_seq_len=self.max_seq_len, tree_rates=tree_rates)
        self.last_stats: Optional[dict] = None
        self.last_result: Optional[GenerationResult] = None   # the last generate call's, whole

    def generate(self, prompt_tokens: List[List[int]], max_gen_len: int, temperature: float = 0.6,
                 top_p: float = 0.9, logprobs: bool = False, echo: bool = False, *,
                 speculative: Optional[str] = None, heads: Optional[int] = None, tree=None, on_tokens=None,
                 stop=None, top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                 logit_bias=None, stop_token_ids=None):
        """The release's Llama.generate: (token lists, logprob lists or None); echo prefixes the prompt.
        speculative, heads, tree, on_tokens, stop, top_k, min_p, the three penalties, logit_bias and
        stop_token_ids (keyword-only, not in the release): as in Generator.generate (on_tokens gets the generated tokens only, echo
        or not).
        Two differences: an eos inside an echoed prompt is kept with everything after it (the release
        cuts the echoed output at the prompt's first eos; only generated tokens stop at eos), and more
        prompts than max_batch_size are taken (continuous batching, see Generator.generate) where the
        release asserts."""
        res = self.last_result = self.generator.generate(prompt_tokens, max_gen_len=max_gen_len, temperature=temperature,
                                      top_p=top_p, logprobs=logprobs, speculative=speculative, heads=heads,
                                      tree=tree, on_tokens=on_tokens, stop=stop, top_k=top_k, min_p=min_p,
                                      repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                      frequency_penalty=frequency_penalty, logit_bias=logit_bias,
                                      stop_token_ids=stop_token_ids)
        self.last_stats = res.stats
        out_tokens, out_logprobs = [], []
        for b, prompt in enumerate(prompt_tokens):
            toks = (list(prompt) if echo else []) + res.tokens[b]
            out_tokens.append(toks)
            if logprobs:
                out_logprobs.append((res.prompt_logprobs[b] if echo else []) + res.logprobs[b])
        return out_tokens, (out_logprobs if logprobs else None)

    def text_completion(self, prompts: List[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False, echo: bool = False, *,
                        speculative: Optional[str] = None, heads: Optional[int] = None, tree=None,
                        on_tokens=None, stop=None, top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                        frequency_penalty=0.0, logit_bias=None, stop_token_ids=None) -> List[dict]:
        """[{"generation": str}] per prompt (plus "tokens" and "logprobs" when logprobs=True).
        speculative, heads, tree: self-speculative decoding, as in Generator.generate; top_k, min_p, the
        three penalties, logit_bias, stop_token_ids and on_tokens too
        (token ids as they come: `tokenizer.TextStream` turns them into text pieces), and stop (the
        generation then ends before the stop string; "tokens" end with the one that completed it)."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, got a single str")
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo,
                                    speculative=speculative, heads=heads, tree=tree, on_tokens=on_tokens, stop=stop,
                                    top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
                                    presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                    logit_bias=logit_bias, stop_token_ids=stop_token_ids)
        generations = [self.tokenizer.decode(t) for t in tokens]
        res = self.last_result
        for b, reason in enumerate(res.finish_reasons):
            if reason == "stop":   # the generation ends before its stop string, where generate found it
                # (with echo the prompt's text comes first: the completion's own text, res.text[b],
                # may have dropped a leading space that the echoed decode keeps)
                before = len(generations[b]) - len(self.tokenizer.decode(res.tokens[b]))
                generations[b] = generations[b][:before + len(res.text[b])]
        if logprobs:
            return [{"generation": generation,
                     "tokens": [self.tokenizer.decode([x]) for x in t],
                     "logprobs": lp} for generation, t, lp in zip(generations, tokens, lps)]
        return [{"generation": generation} for generation in generations]

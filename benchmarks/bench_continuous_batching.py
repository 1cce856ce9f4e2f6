"""Continuous batching against static batches: many prompts through a few cache rows.

    python benchmarks/bench_continuous_batching.py [--out DIR] [--prompts 48] [--rows 8] [--tiny]

The embedded default model (mtp_engine/default_model) on CUDA when there is one (bf16, CUDA graphs),
else on the CPU (float32). The prompts are random token ids of 8-64 tokens; max_gen_len per prompt
is drawn from a skewed mix (most short, a few long: 8, 16, 32 or 128 tokens with probabilities 0.4,
0.3, 0.2, 0.1), greedy, no eos (every prompt generates exactly its max_gen_len), so both contenders
produce the same tokens (checked) and the timing compares only how the rows are used:
  - static: `generate` on consecutive chunks of --rows prompts, as a caller had to before: each
    chunk runs until its longest generation ends, its finished rows idle (the release's way);
  - continuous: one `generate` call over all the prompts; a finished row takes the next waiting
    prompt (a prefill of it alone into that row).
Each for plain decoding and tree speculation (the default tree for --rows rows). Reported: wall time
(median of --repeats calls after one warm-up call per contender, which captures the CUDA graphs),
generated tokens/s and forwards (prefills, each refill one, and steps). speedup = static ms /
continuous ms.
Writes continuous_batching_<device-slug>.json and .md into --out (default benchmarks/results).
--tiny: 10 prompts through 3 rows, max_gen_len 2-24: a pipeline check in seconds.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GEN_LENS, GEN_WEIGHTS = (8, 16, 32, 128), (0.4, 0.3, 0.2, 0.1)
GEN_LENS_TINY = (2, 6, 24)
MODES = (None, "tree")


def workload(n: int, vocab: int, tiny: bool, seed: int = 0):
    """(prompts, max_gen_lens): n random prompts of 8-64 tokens (2-12 with tiny) and skewed lengths."""
    rng = random.Random(seed)
    lengths = (2, 12) if tiny else (8, 64)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]
    gen_lens = ([rng.choice(GEN_LENS_TINY) for _ in range(n)] if tiny
                else rng.choices(GEN_LENS, weights=GEN_WEIGHTS, k=n))
    return prompts, gen_lens


def static_batches(gen, prompts, gen_lens, rows, **kwargs):
    """generate on consecutive chunks of `rows` prompts: (tokens, summed stats of the calls)."""
    tokens, forwards = [], 0
    for first in range(0, len(prompts), rows):
        res = gen.generate(prompts[first:first + rows], max_gen_len=gen_lens[first:first + rows], **kwargs)
        tokens += res.tokens
        forwards += res.stats["forwards"]
    return tokens, {"forwards": forwards}


def run(prompts_n: int, rows: int, tiny: bool, repeats: int) -> dict:
    from mtp_engine.checkpoint import default_checkpoint, load_checkpoint
    from mtp_engine.generate import Generator

    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_checkpoint(default_checkpoint(), device=device, dtype=dtype).eval()
    prompts, gen_lens = workload(prompts_n, model.vocab_size, tiny)
    max_seq_len = max(map(len, prompts)) + max(gen_lens)
    gen = Generator(model, max_batch_size=rows, max_seq_len=max_seq_len)
    result = {"env": common.environment_info(device), "model": "default (" + str(model.params.dim) + " dim, "
              + str(model.params.n_layers) + " layers, V " + str(model.vocab_size) + ")", "dtype": str(dtype),
              "prompts": prompts_n, "rows": rows, "prompt_tokens": sum(map(len, prompts)),
              "generated_tokens": sum(gen_lens), "gen_lens": gen_lens, "repeats": repeats, "modes": []}
    for mode in MODES:
        kwargs = dict(speculative=mode, eos_id=-1)
        calls = {"static": lambda: static_batches(gen, prompts, gen_lens, rows, **kwargs),
                 "continuous": lambda: _one_call(gen, prompts, gen_lens, **kwargs)}
        entry = {"mode": mode or "plain"}
        outputs = {}
        for name, call in calls.items():
            call()   # warm-up: kernel tuning, CUDA graph captures
            times = []
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                tokens, stats = call()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1e3)
            outputs[name] = tokens
            ms = statistics.median(times)
            entry[name] = {"ms": ms, "times_ms": times, "tokens_per_s": sum(gen_lens) / ms * 1e3,
                           "forwards": stats["forwards"]}
        entry["same_tokens"] = outputs["static"] == outputs["continuous"]
        entry["speedup"] = entry["static"]["ms"] / entry["continuous"]["ms"]
        result["modes"].append(entry)
    return result


def _one_call(gen, prompts, gen_lens, **kwargs):
    res = gen.generate(prompts, max_gen_len=gen_lens, **kwargs)
    return res.tokens, {"forwards": res.stats["forwards"]}


def to_markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"# Continuous batching against static batches on {env['device']}", "",
             f"Model: {result['model']}, {result['dtype']}; {result['prompts']} prompts "
             f"({result['prompt_tokens']} prompt tokens) through {result['rows']} cache rows, greedy, no eos, "
             f"{result['generated_tokens']} tokens generated in all (max_gen_len per prompt from a skewed mix). "
             f"Median of {result['repeats']} calls after a warm-up; `benchmarks/bench_continuous_batching.py`. "
             f"torch {env.get('torch')}, triton {env.get('triton')}, {env['date_utc']}.", ""]
    headers = ["decoding", "static ms", "continuous ms", "speedup", "static tokens/s", "continuous tokens/s",
               "static forwards", "continuous forwards", "same tokens"]
    rows = [[m["mode"], m["static"]["ms"], m["continuous"]["ms"], m["speedup"], m["static"]["tokens_per_s"],
             m["continuous"]["tokens_per_s"], m["static"]["forwards"], m["continuous"]["forwards"],
             "yes" if m["same_tokens"] else "NO"] for m in result["modes"]]
    lines.append(common.markdown_table(headers, rows))
    lines += ["", "static: one generate call per chunk of rows (each chunk waits for its longest generation); "
              "continuous: one call, finished rows refilled. forwards: prefills (each refill is one) and decode "
              "or verify steps."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(common.REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--tiny", action="store_true", help="10 prompts through 3 rows: a check in seconds")
    parser.add_argument("--prompts", type=common.positive_int, default=None, help="default 48 (--tiny 10)")
    parser.add_argument("--rows", type=common.positive_int, default=None, help="cache rows, default 8 (--tiny 3)")
    parser.add_argument("--repeats", type=common.positive_int, default=None, help="timed calls, default 3 (--tiny 1)")
    args = parser.parse_args(argv)
    result = run(args.prompts or (10 if args.tiny else 48), args.rows or (3 if args.tiny else 8), args.tiny,
                 args.repeats or (1 if args.tiny else 3))
    slug = result["env"]["device_slug"] + ("_tiny" if args.tiny else "")
    common.write_results(args.out, f"continuous_batching_{slug}", result, to_markdown(result))
    print(to_markdown(result))
    return 0 if all(m["same_tokens"] for m in result["modes"]) else 1


if __name__ == "__main__":
    sys.exit(main())

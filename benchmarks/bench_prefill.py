"""Prefill of a ragged batch: in groups of similar prompt length (Generator's default) against one
forward over every prompt right-padded to the longest (what the Generator did before), and with
shared prompt prefixes computed once (Generator's default, mtp_engine/prefix_sharing.py) against
every prompt computed whole (share_prefixes=False).

    python benchmarks/bench_prefill.py [--out DIR] [--tiny]

Model: on CUDA a random-weight model of the 7B_1T_4 shape in bf16 (bench_generate.SHAPE_7B); on the
CPU the embedded default model in float32. Batches of 8 prompts (lengths scaled to the model's
context): random prompts with lengths spread evenly, seven short prompts beside one long one, and
equal lengths (the control: grouping and sharing must cost nothing there); then prompts that begin
alike: few-shot (one 3/4-context prefix, tails of spread lengths) and n samples (one prompt 8
times). Each case times `Generator.generate(prompts, max_gen_len=1)` (the prefill and the first
token's selection) three ways with benchmarks/common.time_and_peak: one padded forward, groups with
sharing, groups without. Reported: the prompt tokens, the tokens each way computes (padding
included), the tokens sharing copies instead, the forwards, the times, and the floor: the matmul
FLOPs of the tokens that must be computed (prompt tokens less those shared)
(2 x the trunk's and head 0's parameters per token, which a plain prefill runs, plus the unembedding
at each prompt's last position; attention's scores left out) over the matmul rate measured in the
same run. Writes prefill_<device-slug>.json and .md into --out (default benchmarks/results).
--tiny: a tiny random model on the CPU (a pipeline check in seconds, not a measurement).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate  # noqa: E402
import common  # noqa: E402

from mtp_engine import generate as generate_module  # noqa: E402
from mtp_engine.checkpoint import default_checkpoint, load_checkpoint  # noqa: E402
from mtp_engine.generate import Generator, prefill_groups  # noqa: E402

BATCH = 8


def cases(context: int, vocab_size: int, g: torch.Generator) -> dict:
    """Prompts per case, random ids, for a model whose prompts may reach `context` tokens."""
    def tokens(n):
        return torch.randint(3, vocab_size, (n,), generator=g).tolist()

    longest = context
    out = {name: [tokens(n) for n in lengths] for name, lengths in {
        "spread": [round(longest * (i + 1) / BATCH) for i in range(BATCH)],
        "one long": [max(1, longest // 32)] * (BATCH - 1) + [longest],
        "equal": [longest // 2] * BATCH,
    }.items()}
    prefix = tokens(longest * 3 // 4)
    out["few-shot"] = [prefix + tokens(round((longest - len(prefix)) * (i + 1) / BATCH)) for i in range(BATCH)]
    out["n samples"] = [tokens(longest // 2)] * BATCH
    return out


@contextlib.contextmanager
def no_sharing(gen: Generator):
    """Every prompt computed whole (grouping unchanged)."""
    saved, gen.share_prefixes = gen.share_prefixes, False
    try:
        yield
    finally:
        gen.share_prefixes = saved


@contextlib.contextmanager
def one_forward():
    """The prefill as one forward over the right-padded batch: a forward costed at infinitely many
    tokens never splits the batch, and a chunk of infinitely many tokens never cuts it."""
    names = ("PREFILL_FORWARD_TOKENS", "PREFILL_CHUNK_TOKENS")
    saved = {name: getattr(generate_module, name) for name in names}
    saved.update({name + "_DEFAULT": getattr(generate_module, name + "_DEFAULT") for name in names})
    for name in names:
        setattr(generate_module, name, {key: 1 << 62 for key in ("cuda", "cpu")})
        setattr(generate_module, name + "_DEFAULT", 1 << 62)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(generate_module, name, value)


def run(tiny: bool = False) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    if tiny:
        model, context = bench_generate.random_model(bench_generate.SHAPE_TINY, device, torch.float32), 48
    elif device.type == "cuda":
        model, context = bench_generate.random_model(bench_generate.SHAPE_7B, device, torch.bfloat16), 2048
    else:
        model, context = load_checkpoint(default_checkpoint(), device=device, dtype=torch.float32), 1024
    model.eval()
    ceilings = common.measure_ceilings(device)
    # A plain prefill runs the trunk and head 0 (`layers`) at every position, the unembedding at each
    # prompt's last one; the embedding is a lookup.
    params = sum(p.numel() for p in model.layers.parameters())
    unembed_flops = 2 * model.output.weight.numel() * BATCH
    result = {"env": common.environment_info(device), "ceilings": ceilings,
              "model": ("the default model (mtp_engine/default_model) " if not tiny and device.type == "cpu" else "random ")
                       + str({k: getattr(model.params, k) for k in ("dim", "n_layers", "n_heads", "vocab_size",
                                                                     "n_future_tokens")}),
              "dtype": str(model.output.weight.dtype).replace("torch.", ""), "rows": []}
    gen = Generator(model, max_batch_size=BATCH, max_seq_len=context + 1, cuda_graphs=False)
    g = torch.Generator().manual_seed(0)
    forward_tokens = generate_module.PREFILL_FORWARD_TOKENS.get(device.type,
                                                                generate_module.PREFILL_FORWARD_TOKENS_DEFAULT)
    for name, prompts in cases(context, model.vocab_size, g).items():
        lengths = [len(p) for p in prompts]
        row = {"case": name, "lengths": lengths, "prompt_tokens": sum(lengths)}
        groups = prefill_groups(sorted(lengths), forward_tokens)
        ordered = sorted(lengths)
        row["grouped_tokens"] = sum((end - start) * ordered[end - 1] for start, end in groups)
        row["padded_tokens"] = BATCH * max(lengths)
        for label, context_manager in (("one forward", one_forward), ("groups", contextlib.nullcontext),
                                       ("no sharing", lambda: no_sharing(gen))):
            with context_manager():
                timed = common.time_and_peak(lambda: gen.generate(prompts, max_gen_len=1).stats, device=device)
            row[label] = {key: timed.get(key) for key in ("status", "ms", "peak_mib", "error")}
            if timed["status"] == "ok":
                row[label]["forwards"] = timed["result"]["prefill_forwards"]
                row[label]["shared_tokens"] = timed["result"]["shared_prompt_tokens"]
        shared = row["groups"].get("shared_tokens", 0)
        row["floor_ms"] = ((2 * params * (sum(lengths) - shared) + unembed_flops)
                           / (ceilings["matmul_tflops"] * 1e12) * 1e3)
        if row["one forward"]["status"] == row["groups"]["status"] == "ok":
            row["speedup"] = row["one forward"]["ms"] / row["groups"]["ms"]
            row["groups_vs_floor"] = row["groups"]["ms"] / row["floor_ms"]
        if row["no sharing"]["status"] == row["groups"]["status"] == "ok":
            row["sharing_speedup"] = row["no sharing"]["ms"] / row["groups"]["ms"]
        result["rows"].append(row)
    return result


def to_markdown(result: dict) -> str:
    env, ceil = result["env"], result["ceilings"]
    lines = [f"# Ragged-batch prefill on {env['device']} ({result['dtype']})", "",
             f"Model: {result['model']}. Batch {BATCH}; `Generator.generate(prompts, max_gen_len=1)` timed "
             f"(prefill and the first token's selection), median: one padded forward, groups of similar "
             f"length sharing prompt prefixes (the default), and groups without sharing. Floor: 2 x the "
             f"trunk's and head 0's parameters x the prompt tokens not shared, plus the unembedding at each "
             f"last position, over the matmul rate measured in this run "
             f"({ceil['matmul_tflops']:.1f} TFLOP/s {ceil['matmul_dtype']}). torch {env.get('torch')}, "
             f"{env['date_utc']}.", ""]
    headers = ["case", "prompt tokens", "computed: one forward", "computed: groups", "shared", "forwards",
               "one forward ms", "groups ms", "no sharing ms", "speedup vs one forward", "sharing speedup",
               "groups / floor"]
    rows = []
    for r in result["rows"]:
        one, grouped, unshared = r["one forward"], r["groups"], r["no sharing"]
        rows.append([r["case"], r["prompt_tokens"], r["padded_tokens"], r["grouped_tokens"],
                     grouped.get("shared_tokens", "-"), grouped.get("forwards", "-"),
                     *(t["ms"] if t["status"] == "ok" else t["status"] for t in (one, grouped, unshared)),
                     r.get("speedup", "-"), r.get("sharing_speedup", "-"), r.get("groups_vs_floor", "-")])
    lines.append(common.markdown_table(headers, rows))
    lines += ["", "computed: groups counts the tokens of the groups without sharing (with it, the shared "
              "ones are copied, not computed). Lengths: "
              + "; ".join(f"{r['case']}: {r['lengths']}" for r in result["rows"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(common.REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--tiny", action="store_true", help="tiny random model on the CPU: a check in seconds")
    args = parser.parse_args()
    result = run(args.tiny)
    slug = result["env"]["device_slug"] + ("_tiny" if args.tiny else "")
    common.write_results(args.out, f"prefill_{slug}", result, to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Token selection at the unembedding: linear + argmax and linear + sampling without the logits,
against eager PyTorch.

    python benchmarks/bench_sampling.py [--out DIR] [--rows 1 8 64 512] [--tiny]

Shape: on CUDA the 7B unembedding, V = 32000, D = 4096, bf16 (float32 on a CPU without --tiny); rows
R (batch x tree nodes) 1, 8, 64, 512 by default. Contenders, each timed with
benchmarks/common.time_and_peak (do_bench median on CUDA, perf_counter median on a CPU):
  - linear_argmax: greedy, the logits never written;
  - linear_sample, temperature 0.8, top_p 1.0, keyed by per-row seeds/offsets, the temperature one
    per row (all three tensors on the device, made once outside the timed call, as the Generator's
    steps pass them): Gumbel-max in the kernel;
  - linear_sample, temperature 0.8, top_p 0.9 per row: float32 logits written in chunks of rows, the
    nucleus in torch; top_k 50 per row, the same path with a cut (torch.topk of 64) instead; and
    min_p 0.05 per row, a cut relative to the row's most likely token; and repetition 1.2, presence
    0.5, frequency 0.5 per row against a history of 256 generated tokens and a prompt of 512 per row
    (kernels/penalties.py on the logits chunks);
  - eager PyTorch, the Llama release's way: logits = (hidden @ weight.T).float(); greedy
    logits.argmax(-1) on the bf16 product; sampling softmax(logits / T) then torch.multinomial, and
    for top_p 0.9 its sample_top_p (sort, cumulative sum, mask, renormalise, multinomial, gather).
Floors: bytes = the weight read once (V x D x element size) over the device copy bandwidth that
common.measure_ceilings measures in the same run (read + write counted, so one-way traffic at that
rate); matmul = 2 R V D over the measured matmul rate. The ratio is to the larger of the two (from
about 256 bf16 rows on an H100 the matmul binds, not the weight read). "sample / argmax" is keyed
sampling's time over argmax's at the same R: what the noise costs.
Writes sampling_<device-slug>.json and .md into --out (default benchmarks/results).
--tiny: small shapes on the CPU (V = 8192, D = 64, float32, R 1, 8, 64): a pipeline check in
seconds, not a measurement (CPU tensors take the reference path unless MTP_BACKEND=triton under
TRITON_INTERPRET=1; the table says which ran).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHAPE_7B = dict(V=32000, D=4096)
SHAPE_TINY = dict(V=8192, D=64)
ROWS = (1, 8, 64, 512)
ROWS_TINY = (1, 8, 64)
TEMPERATURE = 0.8
TOP_P = 0.9
TOP_K = 50
MIN_P = 0.05
PENALTIES = (1.2, 0.5, 0.5)   # repetition, presence, frequency
HISTORY = dict(generated=256, prompt=512)

CONTENDERS = ("argmax", "sample", "sample_top_p", "sample_top_k", "sample_min_p", "sample_penalties", "eager_argmax",
              "eager_sample", "eager_sample_top_p")
LABELS = {"argmax": "linear_argmax", "sample": "linear_sample T=0.8 (keyed, in-kernel)",
          "sample_top_p": f"linear_sample T=0.8 top_p={TOP_P}", "sample_top_k": f"linear_sample T=0.8 top_k={TOP_K}",
          "sample_min_p": f"linear_sample T=0.8 min_p={MIN_P}",
          "sample_penalties": f"linear_sample T=0.8 penalties {PENALTIES}",
          "eager_argmax": "eager argmax",
          "eager_sample": "eager softmax + multinomial", "eager_sample_top_p": f"eager top_p={TOP_P}"}


def eager_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The Llama release's logits: the model's dtype product, then float32."""
    return (hidden @ weight.T).float()


def eager_sample(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    probs = torch.softmax(eager_logits(hidden, weight) / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1).reshape(-1)


def eager_sample_top_p(hidden: torch.Tensor, weight: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The Llama release's sample_top_p after softmax(logits / T)."""
    probs = torch.softmax(eager_logits(hidden, weight) / temperature, dim=-1)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[probs_sum - probs_sort > top_p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1)
    return torch.gather(probs_idx, -1, next_token).reshape(-1)


def run(tiny: bool = False, rows: tuple = None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    shape = SHAPE_TINY if tiny else SHAPE_7B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = tuple(rows or (ROWS_TINY if tiny else ROWS))
    V, D = shape["V"], shape["D"]
    rep_ms = 20.0 if tiny else 50.0   # per contender; on an H100 the Triton compiles and tuning dominate

    kernels = common.import_mtp_kernels()
    from mtp_kernels.backend import use_triton

    ceilings = (common.measure_ceilings(device, matmul_size=256, copy_bytes=16 * common.MIB, rep_ms=20.0) if tiny
                else common.measure_ceilings(device, rep_ms=50.0))
    g = torch.Generator(device="cpu").manual_seed(0)
    weight = (torch.randn(V, D, generator=g) / D ** 0.5).to(device=device, dtype=dtype)
    weight_bytes = weight.numel() * weight.element_size()
    bytes_floor_ms = weight_bytes / (ceilings["copy_gbps"] * 1e6)
    result = {"env": common.environment_info(device), "ceilings": ceilings, "V": V, "D": D,
              "dtype": str(dtype).replace("torch.", ""), "temperature": TEMPERATURE, "top_p": TOP_P, "top_k": TOP_K,
              "min_p": MIN_P, "penalties": list(PENALTIES), "history": HISTORY,
              "weight_bytes": weight_bytes, "rows": []}
    for R in rows:
        hidden = torch.randn(R, D, generator=g).to(device=device, dtype=dtype)
        seeds = torch.randint(0, 2**62, (R,), generator=g, dtype=torch.int64).to(device)
        offsets = torch.arange(R, dtype=torch.int64).add_(1000).to(device)
        temperatures = torch.full((R,), TEMPERATURE, device=device)
        top_ps = torch.full((R,), TOP_P, device=device)
        top_ks = torch.full((R,), TOP_K, dtype=torch.int64, device=device)
        min_ps = torch.full((R,), MIN_P, device=device)
        penalties = kernels.TokenPenalties(
            torch.zeros(R, V, dtype=torch.int32).scatter_add_(
                1, torch.randint(0, V, (R, HISTORY["generated"]), generator=g),
                torch.ones(R, HISTORY["generated"], dtype=torch.int32)).to(device),
            torch.zeros(R, V, dtype=torch.bool).scatter_(
                1, torch.randint(0, V, (R, HISTORY["prompt"]), generator=g), True).to(device),
            *(torch.full((R,), value, device=device) for value in PENALTIES))
        calls = {
            "argmax": lambda: kernels.linear_argmax(hidden, weight),
            "sample": lambda: kernels.linear_sample(hidden, weight, temperature=temperatures, seeds=seeds,
                                                    offsets=offsets),
            "sample_top_p": lambda: kernels.linear_sample(hidden, weight, temperature=temperatures, top_p=top_ps,
                                                          seeds=seeds, offsets=offsets),
            "sample_top_k": lambda: kernels.linear_sample(hidden, weight, temperature=temperatures, top_k=top_ks,
                                                          seeds=seeds, offsets=offsets, max_top_k=64),
            "sample_min_p": lambda: kernels.linear_sample(hidden, weight, temperature=temperatures, min_p=min_ps,
                                                          seeds=seeds, offsets=offsets),
            "sample_penalties": lambda: kernels.linear_sample(hidden, weight, temperature=temperatures, seeds=seeds,
                                                              offsets=offsets, penalties=penalties),
            "eager_argmax": lambda: (hidden @ weight.T).argmax(-1),
            "eager_sample": lambda: eager_sample(hidden, weight, TEMPERATURE),
            "eager_sample_top_p": lambda: eager_sample_top_p(hidden, weight, TEMPERATURE, TOP_P),
        }
        flops_floor_ms = 2 * R * V * D / (ceilings["matmul_tflops"] * 1e12) * 1e3
        row = {"R": R, "path": "triton" if use_triton(hidden, weight) else "reference",
               "bytes_floor_ms": bytes_floor_ms, "flops_floor_ms": flops_floor_ms,
               "floor_ms": max(bytes_floor_ms, flops_floor_ms)}
        for name in CONTENDERS:
            timed = common.time_and_peak(calls[name], device=device, rep_ms=rep_ms)
            entry = {key: timed.get(key) for key in ("status", "ms", "peak_mib", "error") if key in timed}
            if timed["status"] == "ok":
                tokens = timed["result"]
                entry["tokens_in_range"] = bool(tokens.shape == (R,) and int(tokens.min()) >= 0
                                                and int(tokens.max()) < V)
                entry["vs_floor"] = timed["ms"] / row["floor_ms"]
            row[name] = entry
        if row["argmax"]["status"] == row["sample"]["status"] == "ok":
            row["sample_vs_argmax"] = row["sample"]["ms"] / row["argmax"]["ms"]
        for ours, eager in (("argmax", "eager_argmax"), ("sample", "eager_sample"),
                            ("sample_top_p", "eager_sample_top_p")):
            if row[ours]["status"] == row[eager]["status"] == "ok":
                row[f"{ours}_speedup_vs_eager"] = row[eager]["ms"] / row[ours]["ms"]
        result["rows"].append(row)
        common.free_memory()
    return result


def _ms(entry: dict):
    return entry["ms"] if entry["status"] == "ok" else entry["status"]


def to_markdown(result: dict) -> str:
    env, ceil = result["env"], result["ceilings"]
    lines = [f"# Token selection at the unembedding on {env['device']} ({result['dtype']})", "",
             f"V = {result['V']}, D = {result['D']}; `benchmarks/bench_sampling.py`, median ms "
             f"(`common.time_and_peak`). Sampling at temperature {result['temperature']}, keyed by per-row "
             f"seeds/offsets. Floor: the larger of the weight read ({result['weight_bytes'] / 2**20:.1f} MiB) "
             f"at the copy bandwidth measured in this run ({common.format_cell(ceil['copy_gbps'])} GB/s) and 2 R V D "
             f"at the measured matmul rate ({common.format_cell(ceil['matmul_tflops'])} TFLOP/s "
             f"{ceil['matmul_dtype']}). "
             f"torch {env.get('torch')}, triton {env.get('triton')}, {env['date_utc']}.", ""]
    headers = ["R", "path", "bytes floor", "matmul floor", "argmax", "argmax / floor", "sample", "sample / floor",
               "sample / argmax", f"top_p {result['top_p']}", f"top_k {result['top_k']}",
               f"min_p {result.get('min_p', '-')}", "penalties", "eager argmax", "eager sample",
               f"eager top_p {result['top_p']}", "argmax speedup", "sample speedup", "top_p speedup"]
    rows = []
    for r in result["rows"]:
        rows.append([r["R"], r["path"], r["bytes_floor_ms"], r["flops_floor_ms"],
                     _ms(r["argmax"]), r["argmax"].get("vs_floor", "-"), _ms(r["sample"]),
                     r["sample"].get("vs_floor", "-"), r.get("sample_vs_argmax", "-"), _ms(r["sample_top_p"]),
                     _ms(r["sample_top_k"]), _ms(r["sample_min_p"]) if "sample_min_p" in r else "-",
                     _ms(r["sample_penalties"]) if "sample_penalties" in r else "-",
                     _ms(r["eager_argmax"]), _ms(r["eager_sample"]), _ms(r["eager_sample_top_p"]),
                     r.get("argmax_speedup_vs_eager", "-"), r.get("sample_speedup_vs_eager", "-"),
                     r.get("sample_top_p_speedup_vs_eager", "-")])
    lines.append(common.markdown_table(headers, rows))
    lines += ["", "Times in ms; speedup = eager ms / ours at the same R. path: the kernels that ran "
              "(reference = torch ops, as on a CPU)."]
    errors = [f"R={r['R']} {name}: {r[name].get('error')}" for r in result["rows"] for name in CONTENDERS
              if name in r and r[name]["status"] != "ok"]
    if errors:
        lines += ["", "Failures:", *[f"- {e}" for e in errors]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(common.REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU: a check in seconds")
    parser.add_argument("--rows", type=common.positive_int, nargs="+", default=None,
                        help=f"row counts (default {' '.join(map(str, ROWS))}; --tiny {' '.join(map(str, ROWS_TINY))})")
    args = parser.parse_args(argv)
    result = run(args.tiny, args.rows)
    slug = result["env"]["device_slug"] + ("_tiny" if args.tiny else "")
    common.write_results(args.out, f"sampling_{slug}", result, to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU decode and verify steps, with F.linear and with the GEMM layouts `cpu_linear` times faster.

    python benchmarks/bench_cpu_decode.py [--out DIR] [--batches 1 4] [--kv-len 512] [--dtypes float32 bfloat16]

A random MTP model of SHAPE_CPU (dim 1024, 4 trunk + 4 head blocks, 8 attention heads, V 32000: 168M
parameters, 0.67 GB in float32, a size a laptop decodes) on the CPU, in each of --dtypes. Step costs
as bench_generate measures them (`bench_generate.step_costs`: a plain greedy decode step; verify
steps over trees of 4, 8 and 16 nodes, drafts, tree acceptance and KV compaction included; the
speedup each ratio allows at the prior acceptance rates), twice per dtype in one process: first with
MTP_TUNE=0, so every projection is F.linear (the CPU path before `kernels/cpu_linear.py`), then with
the layouts timed. Both phases take a 16-bit unembedding's float32 logits block by block
(`reference._float32_logits`). Writes cpu_decode_<device-slug>.json and .md into --out (default
benchmarks/results), with the CPU's name, its thread count and the layout chosen for every shape.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate  # noqa: E402
import common  # noqa: E402

from mtp_kernels import cpu_linear  # noqa: E402

SHAPE_CPU = dict(dim=1024, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=256, n_future_tokens=4)
TREE_NODES = (4, 8, 16)
PHASES = (("F.linear", "0"), ("timed layouts", "1"))   # (label, MTP_TUNE)


def run(batches, kv_len: int, dtypes=("float32",)) -> dict:
    device = torch.device("cpu")
    result = {"env": {**common.environment_info(device), "threads": torch.get_num_threads()},
              "model": f"random {SHAPE_CPU}", "kv_len": kv_len, "tree_nodes": list(TREE_NODES), "phases": {}}
    before = os.environ.get("MTP_TUNE")
    try:
        for dtype in dtypes:
            model = bench_generate.random_model(SHAPE_CPU, device, getattr(torch, dtype))
            model.fuse_projections()
            for label, tune in PHASES:
                os.environ["MTP_TUNE"] = tune
                result["phases"][f"{dtype}, {label}"] = bench_generate.step_costs(model, batches, kv_len,
                                                                                   TREE_NODES, device)
    finally:
        if before is None:
            os.environ.pop("MTP_TUNE", None)
        else:
            os.environ["MTP_TUNE"] = before
    result["layouts"] = [{"dtype": str(key[0]).replace("torch.", ""), "rows": key[1], "N": key[2], "K": key[3],
                          "threads": key[4], **value} for key, value in cpu_linear.chosen_layouts().items()]
    return result


def to_markdown(result: dict) -> str:
    env = result["env"]
    nodes = result["tree_nodes"]
    lines = [f"# CPU decode steps on {env['device']} ({env['threads']} threads, torch {env['torch']})", "",
             f"Model: {result['model']}; KV length {result['kv_len']}. Median ms per step "
             "(`bench_generate.step_costs`); ratio = verify / plain; speedup = expected tokens per forward at "
             "the prior acceptance rates over that ratio. GEMMs: \"F.linear\" with MTP_TUNE=0, \"timed layouts\" "
             "as `kernels/cpu_linear.py` chooses; both take a 16-bit unembedding's float32 logits block by block.", ""]
    headers = ["dtype, GEMMs", "batch", "plain ms"] + [f"verify {T} ms" for T in nodes] + [f"verify {T} / plain" for T in nodes]
    headers += [f"speedup {T} nodes" for T in nodes]
    rows = []
    for label, steps in result["phases"].items():
        for r in steps:
            rows.append([label, r["batch"], r["plain_ms"]] + [r.get(f"verify{T}_ms") for T in nodes]
                        + [r.get(f"ratio{T}") for T in nodes] + [r.get(f"est_speedup{T}") for T in nodes])
    lines += [common.markdown_table(headers, rows), ""]
    lines += ["## Layout chosen per shape (ms per call of each, best of 3 timed samples; "
              "\"-\": not timed, see `cpu_linear.time_layouts`)", "",
              common.markdown_table(["dtype", "rows up to", "N", "K", "F.linear ms", "transposed ms", "padded ms", "chosen"],
                                    [[r["dtype"], r["rows"], r["N"], r["K"], r["ms"]["linear"], r["ms"].get("transposed"),
                                      r["ms"].get("padded"), r["layout"]]
                                     for r in sorted(result["layouts"],
                                                     key=lambda r: (r["dtype"], r["N"], r["K"], r["rows"]))])]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(common.REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--kv-len", type=int, default=512)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    result = run(tuple(args.batches), args.kv_len, tuple(args.dtypes))
    common.write_results(args.out, f"cpu_decode_{result['env']['device_slug']}", result, to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

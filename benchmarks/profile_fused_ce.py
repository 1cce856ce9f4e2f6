"""Where the time of our fused loss goes: per-kernel CUDA time of one forward+backward (GPU).

    python benchmarks/profile_fused_ce.py --out DIR

For each shape: torch.profiler over a few fwd+bwd calls, CUDA kernel time grouped as GEMM
(cuBLAS), our Triton chunk kernel, and everything else; plus each GEMM shape timed alone, to
separate "the GEMMs run below the measured peak" from "time spent outside the GEMMs".
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def kernel_group(name: str) -> str:
    low = name.lower()
    if "_ce_chunk_kernel" in low:
        return "ce_chunk (Triton)"
    if any(k in low for k in ("gemm", "cutlass", "sm90_xmma", "cublas", "nvjet", "matmul")):
        return "GEMM (cuBLAS)"
    return "other"


def profile_shape(n, N, D, V, calls=3):
    import triton.testing

    from mtp_kernels import fused_linear_cross_entropy
    from mtp_kernels.linear_ce_driver import (DEFAULT_SCRATCH_BYTES, _fp32_out_gemm_works, add_matmul,
                                               rows_per_chunk, scratch_budget)

    torch.manual_seed(0)
    h = (torch.randn(n, N, D, device="cuda") ).bfloat16().requires_grad_()
    w = (torch.randn(V, D, device="cuda") / D ** 0.5).bfloat16().requires_grad_()
    t = torch.randint(0, V, (n, N), device="cuda")

    def step():
        h.grad = w.grad = None
        fused_linear_cross_entropy(h, w, t).backward()

    step()
    total_ms = triton.testing.do_bench(step, rep=200, return_mode="median")
    groups = common.cuda_kernel_ms(step, kernel_group, calls)
    timeline = common.cuda_idle_gaps(step)
    M = n * N
    # the chunk the default runs (float32 dW sum)
    rows = rows_per_chunk(M, V, 2, scratch_budget(DEFAULT_SCRATCH_BYTES, V, D, 2, wide_dw_sum=True))
    a = torch.randn(rows, D, device="cuda", dtype=torch.bfloat16)
    wt = w.detach()
    logits = torch.randn(rows, V, device="cuda", dtype=torch.bfloat16)
    dW = torch.randn(V, D, device="cuda", dtype=torch.bfloat16)
    dW32 = torch.zeros(V, D, device="cuda", dtype=torch.float32)  # the default accumulator (accum_dtype=float32)
    flop = 2 * rows * D * V
    gemms = {
        "logits = H_c W^T": triton.testing.do_bench(lambda: torch.mm(a, wt.t(), out=logits), rep=100, return_mode="median"),
        "dH_c = G W": triton.testing.do_bench(lambda: torch.mm(logits, wt), rep=100, return_mode="median"),
        "dW += G^T H_c (fp32 sum)": triton.testing.do_bench(lambda: add_matmul(dW32, logits.t(), a), rep=100,
                                                            return_mode="median"),
    }
    bf16_sum_ms = triton.testing.do_bench(lambda: dW.addmm_(logits.t(), a), rep=100, return_mode="median")
    n_chunks = -(-M // rows)
    return {"n": n, "N": N, "D": D, "V": V, "chunk_rows": rows, "chunks": n_chunks, "total_ms": total_ms,
            "fp32_out_gemm": _fp32_out_gemm_works(dW32.device, torch.bfloat16, torch.float32),
            "dw_bf16_sum_alone_ms": bf16_sum_ms, "kernel_ms": groups, "timeline": timeline,
            "gemm_alone_ms": gemms, "gemm_alone_tflops": {k: flop / v / 1e9 for k, v in gemms.items()},
            "gemm_alone_sum_ms": n_chunks * sum(gemms.values())}


def _idle_cell(timeline: dict) -> str:
    gap = (timeline["gaps"] or [None])[0]
    largest = f"; {gap['ms']:.2f} ms: {gap['after'][:40]} -> {gap['before'][:40]}" if gap else ""
    return f"{timeline['idle_ms']:.2f} of {timeline['span_ms']:.1f}{largest}"


def main(out_dir: str):
    results = [profile_shape(4, 8192, 4096, 32000), profile_shape(4, 8192, 4096, 128256),
               profile_shape(4, 16384, 1024, 32000)]
    slug = common.device_slug("cuda")
    common.write_json(os.path.join(out_dir, f"fused_ce_profile_{slug}.json"),
                      {"device": torch.cuda.get_device_name(), "results": results})
    headers = ["shape", "chunks x rows", "total ms", "GEMM ms (in run)", "ce_chunk ms", "other ms",
               "GEMMs alone ms", "GEMM TFLOP/s alone (logits / dH / dW fp32 sum)", "dW bf16 sum TFLOP/s",
               "cuBLAS fp32-out dW", "GPU idle in one step ms (largest gap: after -> before)"]
    table = common.markdown_table(headers, [[
        f"N={r['N']} D={r['D']} V={r['V']}", f"{r['chunks']} x {r['chunk_rows']}", r["total_ms"],
        r["kernel_ms"].get("GEMM (cuBLAS)", 0.0), r["kernel_ms"].get("ce_chunk (Triton)", 0.0),
        r["kernel_ms"].get("other", 0.0), r["gemm_alone_sum_ms"],
        " / ".join(f"{v:.0f}" for v in r["gemm_alone_tflops"].values()),
        2 * r["chunk_rows"] * r["D"] * r["V"] / r["dw_bf16_sum_alone_ms"] / 1e9, r["fp32_out_gemm"],
        _idle_cell(r["timeline"])] for r in results])
    text = (f"# Fused CE time breakdown on {torch.cuda.get_device_name()} (bf16, n=4, default scratch)\n\n"
            f"{table}\n")
    common.write_markdown(os.path.join(out_dir, f"fused_ce_profile_{slug}.md"), text)
    print(text)

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    main(p.parse_args().out)

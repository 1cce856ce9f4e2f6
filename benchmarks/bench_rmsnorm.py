"""RMSNorm: Triton kernel vs the eager reference, bf16, forward and forward+backward (GPU).

    python benchmarks/bench_rmsnorm.py --out DIR

Bytes counted: forward reads x and writes y (2 * M * D * 2 bytes); forward+backward adds the
backward's reads of x and dy and write of dx (3 * M * D * 2 bytes more). Reported as GB/s and
as a ratio to the measured device copy bandwidth.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(out_dir: str) -> list[dict]:
    import triton.testing

    from common import device_slug, markdown_table, measure_ceilings, write_json, write_markdown
    from mtp_kernels import reference, rms_norm

    os.environ.pop("MTP_BACKEND", None)
    ceilings = measure_ceilings("cuda", rep_ms=50)
    bw = ceilings["copy_gbps"]
    rows = []
    for M, D in [(8192, 4096), (32768, 1024), (4096, 8192)]:
        x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
        for name, fn in [("triton", rms_norm), ("eager", reference.rms_norm)]:
            fwd = triton.testing.do_bench(lambda: fn(x, w), rep=100, return_mode="median")

            def fwd_bwd():
                x.grad = w.grad = None
                fn(x, w).backward(dy)

            fb = triton.testing.do_bench(fwd_bwd, rep=100, return_mode="median")
            fwd_bytes, fb_bytes = 2 * M * D * 2, 5 * M * D * 2
            rows.append({"M": M, "D": D, "impl": name, "fwd_ms": fwd, "fwd_bwd_ms": fb,
                         "fwd_GBps": fwd_bytes / fwd / 1e6, "fwd_bwd_GBps": fb_bytes / fb / 1e6,
                         "fwd_frac_of_copy_bw": fwd_bytes / fwd / 1e6 / bw,
                         "fwd_bwd_frac_of_copy_bw": fb_bytes / fb / 1e6 / bw})
    slug = device_slug("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ceilings": ceilings, "rows": rows}
    write_json(os.path.join(out_dir, f"rmsnorm_{slug}.json"), result)
    headers = ["M x D", "impl", "fwd ms", "fwd GB/s", "fwd / copy bw", "fwd+bwd ms", "fwd+bwd GB/s", "fwd+bwd / copy bw"]
    table = markdown_table(headers, [[f"{r['M']}x{r['D']}", r["impl"], r["fwd_ms"], r["fwd_GBps"],
                                      r["fwd_frac_of_copy_bw"], r["fwd_bwd_ms"], r["fwd_bwd_GBps"],
                                      r["fwd_bwd_frac_of_copy_bw"]] for r in rows])
    text = f"# RMSNorm bf16 on {result['device']} (copy bandwidth {bw:.0f} GB/s)\n\n{table}\n"
    write_markdown(os.path.join(out_dir, f"rmsnorm_{slug}.md"), text)
    print(text)
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    main(p.parse_args().out)

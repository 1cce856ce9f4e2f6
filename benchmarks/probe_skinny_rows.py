"""Does x's traffic slow the 64-row decode GEMM tiles? (issue 6's 64-node verify step)

At 64 rows the skinny GEMM tiles read the 7B weights at 2.28-2.66 TB/s, against 2.5-3.0 for the
one-row kernels (H100, seventeenth session). One suspect: every program re-reads its rows of x from
L2 once per n tile, 64 / BLOCK_N bytes of x per weight byte. This probe times every 64-row tile
twice on the same weight shapes (rotated weight copies, CUDA-graph replays, as the launch tuner
times them): with 64 rows of x, and with 1 row in the same 64-row tile, whose other rows are masked
off and never loaded. The tile's loop, weight loads and matmul instructions are the same in both
runs. What differs is x's traffic. If the 1-row run reads the weights at the one-row kernels' rate
(also timed here), x's traffic is the cost, and a kernel that keeps x resident could pay (NOTES.md,
eighteenth session); if the two runs tie, x is not the cost.

    python benchmarks/probe_skinny_rows.py --out DIR
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES_7B = ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))   # (N, K): qkv, wo, w13, w2


def probe(shapes, device: torch.device, dtype: torch.dtype, timer: Callable, l2_bytes: Optional[int] = None) -> dict:
    """For each (N, K): every 64-row tile's ms with 64 rows and with 1 row of x, and the one-row
    launches' best ms (the multiply-add tiles and the 16-row tl.dot tiles), each call on the next
    weight copy. timer(fn) -> ms. Returns {"tiles": [...], "one_row": [...]}, weight GB/s included."""
    from mtp_kernels import skinny_linear as sl
    from mtp_kernels.launch_tuner import rotating_copies

    tiles, one_row = [], []
    g = torch.Generator(device=device).manual_seed(0)
    for N, K in shapes:
        weight = (torch.randn(N, K, device=device, generator=g) * K ** -0.5).to(dtype)
        gb = N * K * weight.element_size() / 1e9
        next_weight = rotating_copies(weight, l2_bytes)
        xs = {M: torch.randn(M, K, device=device, generator=g).to(dtype) for M in (64, 1)}

        def ms(x, launch):
            return float(timer(lambda: sl.skinny_linear_run(x, next_weight(), launch)))
        for launch in sl.skinny_candidates(64, device)[1:]:
            ms_64, ms_1 = ms(xs[64], launch), ms(xs[1], launch)
            tiles.append({"N": N, "K": K, "tile": launch.label(), "ms_64_rows": ms_64, "ms_1_row": ms_1,
                          "GBps_64_rows": gb / ms_64 * 1e3, "GBps_1_row": gb / ms_1 * 1e3,
                          "one_row_speedup": ms_64 / ms_1})
        times = {launch.label(): ms(xs[1], launch) for launch in sl.skinny_candidates(1, device)[1:]}
        best = min(times, key=times.get)
        one_row.append({"N": N, "K": K, "best_tile": best, "ms": times[best], "GBps": gb / times[best] * 1e3,
                        "times_ms": times})
    return {"tiles": tiles, "one_row": one_row}


def to_markdown(result: dict) -> str:
    from common import markdown_table

    env = result["env"]
    lines = [f"# Do x's re-reads slow the 64-row decode GEMM tiles? ({env['device']}, "
             f"torch {env.get('torch', '?')}, triton {env.get('triton', '?')})", "",
             "Each 64-row tile timed with 64 rows of x and with 1 row (the other 63 masked off, never "
             "loaded), same weights (rotated copies), CUDA-graph replays. `benchmarks/probe_skinny_rows.py`; "
             f"copy bandwidth measured here: {result.get('copy_gbps', '-')} GB/s.", "",
             markdown_table(["N", "K", "64-row tile", "ms, 64 rows", "GB/s", "ms, 1 row", "GB/s",
                             "64 rows / 1 row"],
                            [[r["N"], r["K"], r["tile"], r["ms_64_rows"], r["GBps_64_rows"], r["ms_1_row"],
                              r["GBps_1_row"], r["one_row_speedup"]] for r in result["tiles"]]), "",
             "One-row launches (multiply-add and 16-row tiles), the best of each shape:", "",
             markdown_table(["N", "K", "best one-row tile", "ms", "GB/s"],
                            [[r["N"], r["K"], r["best_tile"], r["ms"], r["GBps"]] for r in result["one_row"]]), ""]
    return "\n".join(lines)


def main(out_dir: str) -> dict:
    from common import device_slug, environment_info, measure_ceilings, write_json, write_markdown
    from mtp_kernels.launch_tuner import cuda_graph_ms

    os.environ.pop("MTP_BACKEND", None)
    device = torch.device("cuda")
    result = {"env": environment_info(device), "copy_gbps": measure_ceilings("cuda", rep_ms=50)["copy_gbps"]}
    result.update(probe(SHAPES_7B, device, torch.bfloat16, cuda_graph_ms))
    stem = os.path.join(out_dir, f"skinny_rows_{device_slug(device)}")
    write_json(stem + ".json", result)
    write_markdown(stem + ".md", to_markdown(result))
    return result


if __name__ == "__main__":
    from common import probe_command_line

    probe_command_line(__doc__, main)

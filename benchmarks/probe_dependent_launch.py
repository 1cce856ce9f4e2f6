"""Does programmatic dependent launch pay in a decode step, and does the skinny GEMMs' early weight
tile? (issue 6's plain step, 1.24x its bytes floor on the H200)

A decode step of a 7B-shaped model cut to 8 blocks (random weights, KV length 1024, the Generator's
fused projections, every launch tuned as in a real run) is captured as a CUDA graph three ways and
each graph replayed: ordinary launches; programmatic launches (kernels/dependent_launch.py) whose
skinny GEMMs load their first weight tile before they wait (`skinny_linear.EARLY_WEIGHT_TILE`, the
default); programmatic launches that all wait first. At batch 1 and 8. The generator itself compares
only the first two (`bench_generate`); this probe tells, if programmatic launches lose there, whether
the early tile's registers and shared memory are the cause.

    python benchmarks/probe_dependent_launch.py --out DIR
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPE = dict(dim=4096, n_layers=8, n_heads=32, vocab_size=32000, multiple_of=256, n_future_tokens=1)
KV_LEN = 1024
BATCHES = (1, 8)


def variants() -> dict:
    """label -> a context under which a step is traced that way."""
    from mtp_kernels import skinny_linear
    from mtp_kernels.dependent_launch import programmatic_launch

    @contextlib.contextmanager
    def programmatic(early: bool):
        before = skinny_linear.EARLY_WEIGHT_TILE
        skinny_linear.EARLY_WEIGHT_TILE = early
        try:
            with programmatic_launch():
                yield
        finally:
            skinny_linear.EARLY_WEIGHT_TILE = before

    return {"ordinary": contextlib.nullcontext,
            "programmatic, early weight tile": lambda: programmatic(True),
            "programmatic, waiting first": lambda: programmatic(False)}


def probe(model, batches, kv_len: int, timer: Callable, kernel_count: Optional[Callable] = None) -> list:
    """For each batch: the decode step's ms under every variant (timer(step, setting) -> ms, which
    traces the step under `setting` and times it) and, given kernel_count(tokens, lengths), the
    kernels a step launches; with them the saving per kernel against ordinary launches (us)."""
    device = model.output.weight.device
    rows = []
    for B in batches:
        model.setup_caches(B, kv_len + 8)
        g = torch.Generator(device=device).manual_seed(B)
        with torch.no_grad():   # fill every slot below kv_len, as a prefill would
            model.forward_cached(torch.randint(0, model.vocab_size, (B, kv_len), device=device, generator=g),
                                 torch.zeros(B, dtype=torch.int32, device=device), n_heads=1, check_lengths=False)
        tokens = torch.randint(0, model.vocab_size, (B, 1), device=device, generator=g)
        lengths = torch.full((B,), kv_len, dtype=torch.int32, device=device)

        def step():
            with torch.no_grad():
                return model.forward_cached(tokens, lengths, n_heads=1, check_lengths=False)

        row = {"batch": B, "kv_len": kv_len, "ms": {label: float(timer(step, setting))
                                                    for label, setting in variants().items()}}
        if kernel_count is not None:
            row["kernels"] = kernel_count(tokens[:, 0], lengths)
            row["saved_us_per_kernel"] = {label: (row["ms"]["ordinary"] - ms) * 1e3 / row["kernels"]
                                          for label, ms in row["ms"].items() if label != "ordinary"}
        rows.append(row)
    return rows


def graph_ms(step: Callable, setting: Callable, replays: int = 30) -> float:
    """Median ms of `replays` replays of `step` captured as a CUDA graph under `setting` (two eager
    warm-up runs first, on a side stream: the launch tuners time there)."""
    from mtp_engine.cuda_graphs import CUDAGraphSteps

    with setting():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    return CUDAGraphSteps._replay_ms(graph, lambda: None, reps=replays)   # the generator's own timing


def to_markdown(result: dict) -> str:
    from common import markdown_table

    env = result["env"]
    labels = list(variants())
    lines = [f"# Programmatic dependent launch in a decode step ({env['device']}, torch {env.get('torch', '?')}, "
             f"triton {env.get('triton', '?')})", "",
             f"A 7B-shaped decode step cut to {result['shape']['n_layers']} blocks, KV length {result['kv_len']}, "
             "captured as a CUDA graph three ways; median ms of 30 replays each "
             "(`benchmarks/probe_dependent_launch.py`). Saved per kernel: (ordinary - variant) / kernels a step.", "",
             markdown_table(["batch", "kernels a step"] + [f"{label} ms" for label in labels]
                            + [f"{label}: us saved a kernel" for label in labels[1:]],
                            [[r["batch"], r.get("kernels")] + [r["ms"][label] for label in labels]
                             + [r.get("saved_us_per_kernel", {}).get(label) for label in labels[1:]]
                             for r in result["rows"]]), ""]
    return "\n".join(lines)


def main(out_dir: str) -> dict:
    from bench_generate import kernels_per_decode_forward, random_model
    from common import device_slug, environment_info, write_json, write_markdown
    from mtp_kernels.dependent_launch import programmatic_supported

    os.environ.pop("MTP_BACKEND", None)
    device = torch.device("cuda")
    if not programmatic_supported(device):   # then all three variants would be the ordinary one
        raise SystemExit(f"programmatic dependent launch is off here ({torch.cuda.get_device_name(device)}, "
                         f"MTP_PDL={os.environ.get('MTP_PDL')!r}): nothing to probe")
    model = random_model(SHAPE, device, torch.bfloat16)
    model.fuse_projections()

    def kernel_count(tokens, lengths):
        return kernels_per_decode_forward(model, tokens, lengths)[0]

    result = {"env": environment_info(device), "shape": SHAPE, "kv_len": KV_LEN,
              "rows": probe(model, BATCHES, KV_LEN, graph_ms, kernel_count)}
    stem = os.path.join(out_dir, f"dependent_launch_{device_slug(device)}")
    write_json(stem + ".json", result)
    write_markdown(stem + ".md", to_markdown(result))
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    from common import probe_command_line

    probe_command_line(__doc__, main)

"""Peak memory and time of one training step: all heads at once vs the paper's sequential head schedule.

    python benchmarks/bench_head_schedule.py [--device cpu|cuda] [--out benchmarks/results]

Each schedule runs in its own fresh process (so one's allocator state cannot hide the other's peak):
a model, an AdamW optimizer and its state exist before the measured step; the step is forward +
backward + optimizer step. Peak = the highest memory during the step above the memory right before
it: on CUDA torch.cuda.max_memory_allocated; on CPU the process's peak resident set (ru_maxrss),
which also counts allocator slack and (no warm-up there) the AdamW state, so CPU figures are coarser.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# (name, model fields, batch, seq_len): heads dominate activations when the trunk is short.
CONFIGS = {
    "cpu": [("dim256 2 trunk + 4 heads, V 8192", dict(dim=256, n_layers=6, n_heads=4, vocab_size=8192), 4, 1024)],
    "cuda": [("default preset (dim384, 3+4 blocks), V 8192", dict(dim=384, n_layers=7, n_heads=6, vocab_size=8192), 32, 1024),
             ("dim1024 4 trunk + 4 heads, V 32000", dict(dim=1024, n_layers=8, n_heads=16, vocab_size=32000), 16, 2048)],
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(schedule: str, fields: dict, batch: int, seq_len: int, device: str) -> dict:
    """One warm-up step, then one measured step, in this process."""
    from mtp_engine.model import ModelArgs, Transformer
    from mtp_engine.train import MTPTrainModel, init_weights

    torch.manual_seed(0)
    args = ModelArgs(**fields, n_future_tokens=4, multiple_of=64, max_seq_len=seq_len)
    model = Transformer(args)
    init_weights(model)
    model.to(device)
    module = MTPTrainModel(model)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    tokens = torch.randint(0, args.vocab_size, (batch, seq_len), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            if schedule == "sequential":
                module.forward_backward_sequential(tokens)
            else:
                module(tokens).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device == "cuda":
        step()  # optimizer state now exists; allocator warmed
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**20 - before
    else:
        # ru_maxrss is a lifetime peak, so no warm-up step here: the measured step also creates the
        # AdamW state (the same 2 x params for both schedules).
        before = _rss_mib()
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return {"schedule": schedule, "peak_mib": peak, "step_s": seconds, "params": model.num_params()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(**spec)))
        return

    from common import device_slug, environment_info, markdown_table, write_json, write_markdown

    env = environment_info(args.device)
    slug = device_slug(args.device)

    def save(rows, records):  # after each model size: a run cut off by its time limit keeps the rest
        write_json(os.path.join(args.out, f"head_schedule_{slug}.json"), {"env": env, "results": records})
        table = markdown_table(["model", "tokens", "params", "batched peak MiB", "sequential peak MiB",
                                "sequential / batched", "batched step s", "sequential step s"], rows)
        write_markdown(os.path.join(args.out, f"head_schedule_{slug}.md"),
                       f"# Training step memory: all heads vs sequential heads ({env['device']}, {env['date_utc']})\n\n"
                       f"{table}\n\nPeak above the memory held before the step; "
                       + ("CUDA allocator peak (model, AdamW state and inputs held before it).\n" if args.device == "cuda"
                          else "CPU peak resident set, coarse: the model and inputs held before it; the step "
                          "creates the AdamW state (2 x params x 4 bytes, in both peaks).\n"))

    rows, records = [], []
    for name, fields, batch, seq_len in CONFIGS["cuda" if args.device == "cuda" else "cpu"]:
        result = {}
        for schedule in ("batched", "sequential"):
            spec = dict(schedule=schedule, fields=fields, batch=batch, seq_len=seq_len, device=args.device)
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True)
            if proc.returncode != 0:  # one failed size (out of memory, say) is recorded, not fatal
                result[schedule] = {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
                continue
            result[schedule] = json.loads(proc.stdout.strip().splitlines()[-1])
        records.append({"config": name, "batch": batch, "seq_len": seq_len, **result})
        b, s = result["batched"], result["sequential"]
        if "error" in b or "error" in s:
            print(f"{name}: {b.get('error') or s.get('error')}", flush=True)
            continue
        rows.append([name, f"{batch}x{seq_len}", b["params"], b["peak_mib"], s["peak_mib"],
                     s["peak_mib"] / b["peak_mib"], b["step_s"], s["step_s"]])
        print(rows[-1], flush=True)
        save(rows, records)
    save(rows, records)


if __name__ == "__main__":
    main()

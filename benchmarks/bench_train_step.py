"""One training step (forward, the fused n-head loss, backward) eager, with activation checkpointing,
and under torch.compile.

    python benchmarks/bench_train_step.py [--out DIR] [--backend inductor] [--tiny]

What `mtp train --compile` changes: the step of `MTPTrainModel` (batched heads) as one
`torch.compile(fullgraph=True)` graph, the Triton kernels (loss, RMSNorm, flash attention) inside it
as custom ops, against the same module called eagerly. What `mtp train --activation-checkpointing`
costs and saves: the eager step with every block checkpointed (its forward run again in the
backward), timed, with the bytes autograd keeps between forward and backward counted for both eager
steps (common.saved_activation_bytes). bf16 autocast over float32 master weights
on CUDA, as `mtp train` runs; float32 on a CPU. The timed call is forward + backward with the
gradients set to None before it (the optimizer step is the same for both and left out).
Each contender is timed with benchmarks/common.time_and_peak (two warm-up calls, the compile among
them, then the do_bench median on CUDA or the perf_counter median on a CPU; peak memory on CUDA).
The first compiled call is reported apart: the compile, and on a GPU the first tuning of the
kernels' launches at these shapes (the eager timing's own warm-up call tunes them too).
Floor: the step's matmul FLOPs over the matmul rate measured in the same run (common.measure_ceilings:
bf16 8192^3 on CUDA, float32 1024^3 on a CPU): 6 x tokens x (the blocks' projection weights + n x
the unembedding) plus causal attention, 6 x layers x T^2 x D per sequence (QK^T and PV, halved by
the mask, times 3 for the backward).
Writes train_step_<device-slug>.json and .md into --out (default benchmarks/results).
--tiny: a small model on the CPU with the aot_eager backend (no C++ compiler needed): a pipeline
check in seconds, not a measurement.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# (name, model fields, batch, seq_len)
CONFIGS = {
    "cuda": [("default preset (dim 384, 3 + 4 blocks), V 8192", dict(dim=384, n_layers=7, n_heads=6, vocab_size=8192),
              32, 1024),
             ("dim 1024, 4 + 4 blocks, V 32000", dict(dim=1024, n_layers=8, n_heads=16, vocab_size=32000), 16, 2048)],
    "cpu": [("cpu preset (dim 192, 2 + 4 blocks), V 8192", dict(dim=192, n_layers=6, n_heads=4, vocab_size=8192),
             4, 512)],
    "tiny": [("tiny (dim 32, 2 + 2 blocks), V 512", dict(dim=32, n_layers=4, n_heads=4, vocab_size=512), 2, 64)],
}
N_FUTURE = {"cuda": 4, "cpu": 4, "tiny": 2}


def step_flops(model, batch: int, seq_len: int) -> float:
    """Matmul FLOPs of forward + backward: 6 per weight per token for every projection (trunk and head
    blocks, the unembedding once per head) and the causal attention of every block."""
    tokens = batch * seq_len
    blocks = list(model.layers) + list(model.extra_heads)   # the trunk, head 0's block, the other heads
    projections = sum(lin.weight.numel() for block in blocks for lin in _linears(block))
    projections += model.n_future_tokens * model.output.weight.numel()
    attention = 6 * len(blocks) * batch * seq_len ** 2 * model.params.dim
    return 6 * tokens * projections + attention


def _linears(block):
    return [m for m in block.modules() if isinstance(m, torch.nn.Linear)]


def measure(name: str, fields: dict, batch: int, seq_len: int, n_future: int, device: torch.device, backend: str,
            rate: float, rep_ms: float) -> dict:
    """Eager, checkpointed and compiled steps of one model (made here, freed on return)."""
    import torch._dynamo

    from mtp_engine.model import ModelArgs, Transformer
    from mtp_engine.train import MTPTrainModel, init_weights
    from mtp_kernels.backend import use_triton

    torch.manual_seed(0)
    args = ModelArgs(**fields, n_future_tokens=n_future, multiple_of=64, max_seq_len=seq_len)
    model = Transformer(args)
    init_weights(model)
    model.to(device)
    model.freqs_cis = model.freqs_cis.to(device)
    module = MTPTrainModel(model)
    tokens = torch.randint(0, args.vocab_size, (batch, seq_len), device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=backend, fullgraph=True)

    def step(fn):
        def call():
            with autocast:
                loss = fn(tokens).loss
            loss.backward()
            return loss.detach()
        return call

    def no_grads():
        module.zero_grad(set_to_none=True)
    flops = step_flops(model, batch, seq_len)
    entry = {"config": name, "batch": batch, "seq_len": seq_len, "params": model.num_params(),
             "n_future": n_future, "flops": flops, "floor_ms": flops / rate * 1e3,
             "path": "triton" if use_triton(model.output.weight) else "reference"}
    no_grads()
    start = time.perf_counter()
    try:
        step(compiled)()
        common._synchronize(device)
        entry["first_compiled_call_s"] = time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - recorded; the eager row still runs
        entry["compile_error"] = f"{type(err).__name__}: {err}"[:2000]
    for label, fn in (("eager", module), ("checkpointed", module), ("compiled", compiled)):
        if label == "compiled" and "compile_error" in entry:
            entry[label] = {"status": "error", "error": entry["compile_error"]}
            continue
        model.set_activation_checkpointing(label == "checkpointed")
        timed = common.time_and_peak(step(fn), no_grads, device=device, rep_ms=rep_ms)
        entry[label] = {key: timed.get(key) for key in ("status", "ms", "peak_mib", "error") if key in timed}
        if timed["status"] == "ok":
            entry[label]["loss"] = float(timed["result"])
            entry[label]["vs_floor"] = timed["ms"] / entry["floor_ms"]
            entry[label]["tokens_per_s"] = batch * seq_len / (timed["ms"] * 1e-3)
            with autocast:
                entry[label]["saved_mib"] = common.saved_activation_bytes(module, lambda: fn(tokens)) / common.MIB
        no_grads()
    model.set_activation_checkpointing(False)
    if entry["eager"]["status"] == entry["compiled"]["status"] == "ok":
        entry["speedup"] = entry["eager"]["ms"] / entry["compiled"]["ms"]
    if entry["eager"]["status"] == entry["checkpointed"]["status"] == "ok":
        entry["checkpointed_slowdown"] = entry["checkpointed"]["ms"] / entry["eager"]["ms"]
    return entry


def run(tiny: bool = False, backend: str = "inductor", save=lambda result: None) -> dict:
    common.import_mtp_kernels()
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    kind = "tiny" if tiny else device.type
    backend = "aot_eager" if tiny else backend
    ceilings = (common.measure_ceilings(device, matmul_size=256, copy_bytes=16 * common.MIB, rep_ms=20.0) if tiny
                else common.measure_ceilings(device, rep_ms=50.0))
    result = {"env": common.environment_info(device), "ceilings": ceilings, "backend": backend,
              "autocast": "bfloat16" if device.type == "cuda" else None, "configs": []}
    for name, fields, batch, seq_len in CONFIGS[kind]:
        result["configs"].append(measure(name, fields, batch, seq_len, N_FUTURE[kind], device, backend,
                                         ceilings["matmul_tflops"] * 1e12, rep_ms=50.0 if tiny else 300.0))
        save(result)   # after each model: a run cut off by its time limit keeps what it measured
        common.free_memory()
    return result


def _cell(entry: dict, key: str):
    return entry.get(key, "-") if entry["status"] == "ok" else entry["status"]


def to_markdown(result: dict) -> str:
    env, ceil = result["env"], result["ceilings"]
    precision = "bf16 autocast over float32 weights" if result["autocast"] else "float32"
    lines = [f"# Training step: eager, activation checkpointing, torch.compile on {env['device']} ({precision})", "",
             f"`benchmarks/bench_train_step.py`: forward + fused n-head loss + backward of `MTPTrainModel` "
             f"(batched heads), median ms (`common.time_and_peak`); compiled with backend `{result['backend']}`, "
             f"fullgraph. Floor: the step's matmul FLOPs at the matmul rate measured in this run "
             f"({common.format_cell(ceil['matmul_tflops'])} TFLOP/s {ceil['matmul_dtype']}). "
             f"torch {env.get('torch')}, triton {env.get('triton')}, {env['date_utc']}.", ""]
    headers = ["model", "tokens", "heads", "path", "floor ms", "eager ms", "eager / floor", "compiled ms",
               "compiled / floor", "speedup", "eager peak MiB", "compiled peak MiB",
               "first compiled call s (compile + tuning)"]
    rows = []
    for c in result["configs"]:
        e, k = c["eager"], c["compiled"]
        rows.append([c["config"], f"{c['batch']}x{c['seq_len']}", c["n_future"], c["path"], c["floor_ms"],
                     _cell(e, "ms"), _cell(e, "vs_floor"), _cell(k, "ms"), _cell(k, "vs_floor"),
                     c.get("speedup", "-"), _cell(e, "peak_mib"), _cell(k, "peak_mib"),
                     c.get("first_compiled_call_s", "-")])
    lines.append(common.markdown_table(headers, rows))
    lines += ["", "speedup = eager ms / compiled ms. Peak: memory above what was allocated before the call "
              "(CUDA only). path: the kernels that ran (reference = torch ops, as on a CPU).", "",
              "Activation checkpointing (`mtp train --activation-checkpointing`: every block's forward runs "
              "again in the backward), eager. Kept MiB: what autograd holds between forward and backward, "
              "parameters left out (`common.saved_activation_bytes`); not the peak, which adds what the step "
              "holds for a moment (the loss's logit scratch, the backward's tensors).", ""]
    headers = ["model", "eager ms", "checkpointed ms", "checkpointed / eager", "checkpointed / floor",
               "eager kept MiB", "checkpointed kept MiB", "compiled kept MiB", "eager peak MiB",
               "checkpointed peak MiB"]
    rows = []
    for c in result["configs"]:
        e, a, k = c["eager"], c["checkpointed"], c["compiled"]
        rows.append([c["config"], _cell(e, "ms"), _cell(a, "ms"), c.get("checkpointed_slowdown", "-"),
                     _cell(a, "vs_floor"), e.get("saved_mib", "-"), a.get("saved_mib", "-"), k.get("saved_mib", "-"),
                     _cell(e, "peak_mib"), _cell(a, "peak_mib")])
    lines.append(common.markdown_table(headers, rows))
    errors = [f"{c['config']} {label}: {c[label].get('error')}" for c in result["configs"]
              for label in ("eager", "checkpointed", "compiled") if c[label]["status"] != "ok"]
    if errors:
        lines += ["", "Failures:", *[f"- {e}" for e in errors]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(common.REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU, aot_eager: a check in seconds")
    args = parser.parse_args(argv)
    def save(result):
        slug = result["env"]["device_slug"] + ("_tiny" if args.tiny else "")
        common.write_results(args.out, f"train_step_{slug}", result, to_markdown(result))
    run(args.tiny, args.backend, save)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Self-speculative generation: step costs and end-to-end tokens/s, plain vs chain vs tree.

    python benchmarks/bench_generate.py [--out DIR] [--ckpt-dir DIR] [--tiny] [--gen-len N] [--batches B ...]
                                        [--tree-tokens N ...]

1. Step costs on a random-weight model of the 7B_1T_4 shape (dim 4096, 28 trunk + 4 head blocks,
   32 attention heads, V 32000, bf16), KV length 1024 per sequence, batch 1, 8, 32: one plain
   decode step (as Generator's greedy loop: cached forward of 1 token with head 0, then linear +
   argmax) and one verify step (Generator._verify_step: candidates from drafts, one forward of all
   nodes with all 4 heads, head-0 linear argmax at every node, tree_accept, KV compaction, next
   drafts) over trees of 4 to 64 nodes, with CUDA graphs as the Generator uses them: each step is
   captured four ways, the head blocks as concurrent graph branches or in order, times one or two
   reads of the unembedding (`Generator.shared_unembed`), and the fastest kept; all four timings
   reported. Ratio =
   verify / plain: at a given tokens per forward, the speedup over plain decoding is
   tokens_per_forward / ratio, estimated per tree at the prior acceptance rates. The peer, timed in
   the same run: the plain step in eager PyTorch (MTP_BACKEND=reference, no CUDA graphs). Also the CUDA
   kernels one eager decode forward launches (torch.profiler), per block, and each step's kernel
   time by group.
2. End to end with `Generator.generate` (greedy): tokens/s and tokens/forward for plain, chain, the
   default tree (sized to the batch, built from the checkpoint's tree.json rates), the fixed
   preset of the heads ("tree heads<k>") and, with --tree-tokens, the default tree at other
   tree-token budgets, at batch 1, 8, 32, on the trained checkpoint (--ckpt-dir, default mtp_engine/default_model,
   prompts = held-out standard-library code, as `mtp eval` picks them) when there is one, else on
   the random 7B-shaped model (random heads accept almost nothing: that row shows overheads, not
   speedups).
--tiny: a tiny fp32 model on the CPU (a pipeline check in seconds, not a measurement).
Timing: benchmarks/common.time_and_peak (CUDA: do_bench median). Writes
generate_<device-slug>.json and .md into --out (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import charts  # noqa: E402
import common  # noqa: E402

common.import_mtp_kernels()
sys.path.insert(0, str(common.REPO_ROOT))

from mtp_engine import ModelArgs, Transformer  # noqa: E402
from mtp_engine.generate import Generator  # noqa: E402
from mtp_engine.llama import read_tree_rates  # noqa: E402
from mtp_engine.speculative import (TokenTree, build_tree, default_tree_name, expected_accept_length,  # noqa: E402
                                    prior_rates)

SHAPE_7B = dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, n_future_tokens=4)
SHAPE_TINY = dict(dim=64, n_layers=6, n_heads=4, vocab_size=256, multiple_of=16, n_future_tokens=4)
BATCHES = (1, 8, 32)
TREE_NODES = (4, 8, 16, 32, 64)   # nodes with the root; prior-rate trees (build_tree)
PAPER_TOKENS_PER_FORWARD = 3.5   # 7B_1T_4 on code (Gloeckle et al. 2024)


def random_model(shape: dict, device: torch.device, dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(ModelArgs(**shape, max_seq_len=2048))
    return model.to(dtype).eval()


# ------------------------------------------------------------------------------ step costs
def kernels_per_decode_forward(model: Transformer, tokens: torch.Tensor, seqlens: torch.Tensor):
    """CUDA kernels (memsets and copies included) that one eager plain-decode forward launches, as
    torch.profiler counts them, and the count per kernel name; None off CUDA."""
    if tokens.device.type != "cuda":
        return None
    def forward():
        model.forward_cached(tokens[:, None], seqlens, n_heads=1, check_lengths=False)

    forward()   # once outside the profile: a shape's first call tunes its launches (many kernels, once)
    prof = common.cuda_profile(forward)
    kernels = {e.key: e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA}
    return sum(kernels.values()), dict(sorted(kernels.items(), key=lambda kv: -kv[1]))


def decode_bytes(model: Transformer, batch: int, kv_len: int) -> int:
    """Bytes a plain decode step must read at least: the weights of `layers` (trunk + head 0), the
    final norm and the unembedding, plus every sequence's K and V cache in those blocks."""
    weights = sum(p.numel() * p.element_size() for m in (model.layers, model.norm, model.output)
                  for p in m.parameters())
    cache = 2 * len(model.layers) * batch * kv_len * model.k_cache.shape[-2] * model.k_cache.shape[-1] \
        * model.k_cache.element_size()
    return weights + cache


STEP_KERNEL_GROUPS = (("GEMM (cuBLAS or skinny)",
                       ("nvjet", "gemm", "cutlass", "splitk", "cublas", "xmma", "_skinny_linear")),
                      ("attention", ("_kv_attn", "_kv_combine")), ("norms", ("rms_norm",)),
                      ("rotary + cache write", ("_rope_cache",)), ("swiglu", ("_swiglu",)),
                      ("linear argmax / logits", ("_linear_select", "_linear_logits", "_merge_candidates")),
                      ("tree accept + compaction", ("_tree_accept", "_compact_kv")))


def skinny_launch_report() -> list:
    """What the decode GEMM tuner measured for every projection shape the step costs ran (empty
    on a CPU, where nothing is tuned): cuBLAS and cuBLASLt against the best kernel tile, the best
    warp-specialized tile on its own (skinny_ws.py; "-" where none was timed), and the choice."""
    from mtp_kernels import skinny_linear

    rows = []
    for key, times in skinny_linear._TUNER.times.items():
        _, dtype, row_tile, N, K = key   # a tuning covers every row count up to its row tile (1, 16, 32, 64)
        weight_mb = N * K * torch.empty((), dtype=dtype).element_size() / 1e6
        kernel = min((c for c in times if isinstance(c, skinny_linear.SkinnyLaunch)), key=times.get, default=None)
        ws = min((c for c in times if isinstance(c, skinny_linear.SkinnyLaunch) and c.ws), key=times.get, default=None)
        lt = skinny_linear.BlasLaunch("cublaslt")
        chosen = skinny_linear._TUNER.chosen[key]
        tile = kernel.label() if kernel else "-"   # e.g. "64x64x128 dot w4 s4 k2" (k2: K split in 2)
        kernel_ms = times[kernel] if kernel else None   # (times.get(None) would be cuBLAS's)
        ws_ms = times[ws] if ws else None
        rows.append({"row_tile": row_tile, "N": N, "K": K, "cublas_ms": times.get(None),
                     "cublas_GBps": _rate(weight_mb, times.get(None)),
                     "cublaslt_ms": times.get(lt), "cublaslt_GBps": _rate(weight_mb, times.get(lt)),
                     "best_tile": tile, "kernel_ms": kernel_ms, "kernel_GBps": _rate(weight_mb, kernel_ms),
                     "ws_tile": ws.label() if ws else "-", "ws_ms": ws_ms, "ws_GBps": _rate(weight_mb, ws_ms),
                     "chosen": "cuBLAS" if chosen is None else chosen.label(), "times_ms": _labelled(times, "cuBLAS")})
    return rows


def _rate(megabytes: float, ms) -> float | None:
    """GB/s of `megabytes` read in `ms` (None where not timed or the launch failed: inf)."""
    return megabytes / ms if ms and ms < float("inf") else None


def _labelled(times: dict, none_label: str) -> dict:
    """A tuner's {launch: ms} by label (None: none_label), every candidate, for the JSON."""
    return {none_label if c is None else c.label(): ms for c, ms in times.items()}


def epilogue_launch_report(kind: str) -> list:
    """What an epilogue's tuner measured (empty on a CPU), kind "swiglu" (the gate/up GEMM) or
    "rope" (the q/k/v GEMM): the unfused pair (the chosen GEMM, then the swiglu or rotary kernel)
    against the best tile with the epilogue, weight GB/s of both. N: the fused weight's rows.
    "swiglu_norm", "rope_norm": the norm prologue's tuners (the unfused pair: add_rms_norm, then the
    projection as its tuner chose it), with "add": whether the rows carried a residual add."""
    from mtp_kernels import skinny_fused, skinny_norm

    tuner = {"swiglu": skinny_fused._SWIGLU_TUNER, "rope": skinny_fused._ROPE_TUNER,
             "swiglu_norm": skinny_norm._NORM_TUNERS["skinny_linear_swiglu"],
             "rope_norm": skinny_norm._NORM_TUNERS["skinny_linear_rope"]}[kind]
    rows = []
    for key, times in tuner.times.items():
        dtype, row_tile, N, K = key[1:5]   # N, K: the fused weight's shape
        weight_mb = N * K * torch.empty((), dtype=dtype).element_size() / 1e6
        fused = min((c for c in times if c is not None), key=times.get, default=None)
        chosen = tuner.chosen[key]
        ms = times.get(fused) if fused else None
        rows.append({"row_tile": row_tile, "N": N, "K": K, "unfused_ms": times.get(None),
                     "unfused_GBps": _rate(weight_mb, times.get(None)),
                     "best_tile": fused.label() if fused else "-", "fused_ms": ms,
                     "fused_GBps": _rate(weight_mb, ms),
                     "chosen": "unfused" if chosen is None else chosen.label(), "times_ms": _labelled(times, "unfused")})
        if kind.endswith("_norm"):
            rows[-1]["add"] = key[6]
    return rows


def select_launch_report() -> list:
    """What the token-selection tuner measured past 64 rows (empty on a CPU): for each shape
    (rows up to, V, D, ranks kept), every tile's CUDA-graph ms, the fixed rule's tile (listed
    first) and the chosen one, with the chosen tile's TFLOP/s."""
    from mtp_kernels import sampling

    rows = []
    for key, times in sampling._SELECT_TUNER.times.items():
        _, _, rows_up_to, V, D, top_k = key
        first, chosen = next(iter(times)), sampling._SELECT_TUNER.chosen[key]
        ms = times[chosen]
        rows.append({"rows": rows_up_to, "V": V, "D": D, "top_k": top_k, "fixed_tile": first.label(),
                     "fixed_ms": times[first], "chosen": chosen.label(), "chosen_ms": ms,
                     "chosen_TFLOPs": 2 * rows_up_to * V * D / ms / 1e9 if ms < float("inf") else None,
                     "times_ms": {tile.label(): t for tile, t in times.items()}})
    return rows


def kv_launch_report() -> list:
    """What the KV-cache attention tuner measured for every attention shape the step costs ran
    (empty on a CPU): the heuristic's launch, the chosen one and every candidate's CUDA-graph ms."""
    from mtp_kernels import kv_cache_attention

    rows = []
    for key, times in kv_cache_attention._KV_TUNER.times.items():
        device, _, B, Tq, H, D, S_max, Hkv, tree = key
        heuristic = kv_cache_attention._kv_heuristic(B, Hkv, (H // Hkv) * Tq, S_max, torch.device(device))
        chosen = kv_cache_attention._KV_TUNER.chosen[key]
        rows.append({"B": B, "Tq": Tq, "H": H, "Hkv": Hkv, "D": D, "S_max": S_max, "tree": tree,
                     "heuristic": heuristic.label(), "heuristic_ms": times.get(heuristic),
                     "chosen": chosen.label(), "chosen_ms": times.get(chosen),
                     "times_ms": {c.label(): ms for c, ms in times.items()}})
    return rows


def step_variant_choice(gen: Generator, step: tuple):
    """({variant label: replay ms}, the label kept) that the capture of a step measured
    (CUDAGraphSteps.variant_choices): step ("verify", nodes) for the greedy verify step over a tree of
    that many nodes, ("plain",) for the greedy plain step; None without graphs or variants."""
    for key, variant_ms, kept in (gen._graphs.variant_choices() if gen._graphs else []):
        if key[2:2 + len(step)] == step:
            return variant_ms, kept
    return None


def step_kernel_group(name: str) -> str:
    low = name.lower()
    return next((group for group, keys in STEP_KERNEL_GROUPS if any(k in low for k in keys)), "other")


def group_kernel_ms(per_kernel: dict, top_other: int = 4) -> dict:
    """Kernel ms per name -> ms per STEP_KERNEL_GROUPS group, their sum, and under "other_kernels"
    the `top_other` largest kernels that no group names (what "other" is made of), largest first."""
    groups: dict = {}
    other = []
    for name, ms in per_kernel.items():
        group = step_kernel_group(name)
        groups[group] = groups.get(group, 0.0) + ms
        if group == "other":
            other.append((name, ms))
    other.sort(key=lambda item: -item[1])
    return {"kernels_ms": sum(groups.values()), **{k: round(v, 4) for k, v in sorted(groups.items())},
            "other_kernels": {name[:80]: round(ms, 4) for name, ms in other[:top_other]}}


def kernel_breakdown(step) -> dict:
    """CUDA kernel ms per step by group (common.cuda_kernel_ms, see group_kernel_ms)."""
    return group_kernel_ms(common.cuda_kernel_ms(step, lambda name: name))


@contextlib.contextmanager
def eager_pytorch(gen: Generator):
    """gen's steps in eager PyTorch inside: MTP_BACKEND=reference (every op on its PyTorch twin,
    `kernels/reference.py`, CUDA or not) and no CUDA graphs; both restored after. (The same
    Generator, not a second one: a new Generator would set the model's caches up again under the
    first one's captured graphs.)"""
    saved_backend, saved_graphs = os.environ.get("MTP_BACKEND"), gen.cuda_graphs
    os.environ["MTP_BACKEND"], gen.cuda_graphs = "reference", False
    try:
        yield
    finally:
        gen.cuda_graphs = saved_graphs
        if saved_backend is None:
            del os.environ["MTP_BACKEND"]
        else:
            os.environ["MTP_BACKEND"] = saved_backend


@torch.inference_mode()
def step_costs(model: Transformer, batches, kv_len: int, tree_nodes, device) -> list:
    """Plain decode step and verify steps, ms (median), per batch size; the plain step also as a
    ratio to its bytes floor (decode_bytes over the copy bandwidth measured now, read + write
    counted, so reading alone is held to the same rate) and to the same step in eager PyTorch
    (`eager_pytorch`, no CUDA graphs), timed in the same run."""
    copy_gbps = common.measure_ceilings(device)["copy_gbps"]
    rows = []
    heads = model.n_future_tokens
    rates = prior_rates(heads)
    paths = {T: build_tree(rates, T - 1) for T in tree_nodes}
    trees = {T: TokenTree.from_paths(paths[T], heads).on(device) for T in tree_nodes}
    expected = {T: expected_accept_length(paths[T], rates) for T in tree_nodes}
    for B in batches:
        gen = Generator(model, max_batch_size=B, max_seq_len=kv_len + max(tree_nodes))
        seqlens = torch.full((B,), kv_len, dtype=torch.int32, device=device)
        tokens = torch.randint(0, model.vocab_size, (B,), device=device)
        # Fill the caches with something: one prefill-sized forward writes every slot below kv_len.
        model.forward_cached(torch.randint(0, model.vocab_size, (B, kv_len), device=device),
                             torch.zeros(B, dtype=torch.int32, device=device), n_heads=heads)

        stay = torch.zeros(B, dtype=torch.int32, device=device)   # lengths not advanced: every step alike

        def plain_step():  # as Generator's greedy plain loop: decode forward and linear + argmax, one graph
            return gen._plain_step(tokens, seqlens, stay)[0]

        row = {"batch": B, "kv_len": kv_len, "blocks_per_decode": len(model.trunk) + 1}
        try:
            counted = kernels_per_decode_forward(model, tokens, seqlens)
            if counted is not None:  # the names say which op launched more than one kernel (cuBLAS split-K, ...)
                row["kernels_per_decode"], row["decode_kernel_names"] = counted
        except Exception as exc:  # the count is a diagnostic: never lose the timings to it
            row["kernels_per_decode"] = f"failed: {exc}"[:200]
        res = common.time_and_peak(plain_step, device=device)
        row["plain_ms"] = res.get("ms")
        row["plain_status"] = res["status"]
        row["copy_gbps"] = copy_gbps
        if device.type == "cuda" and res["status"] == "ok":  # where the time goes: kernels by group
            row["plain_kernel_ms"] = kernel_breakdown(plain_step)
        row["plain_floor_ms"] = decode_bytes(model, B, kv_len) / (copy_gbps * 1e6)
        if row["plain_ms"]:
            row["plain_x_floor"] = row["plain_ms"] / row["plain_floor_ms"]
        # The peer in the same run: the same step in eager PyTorch (the reference path: cuBLAS GEMMs,
        # eager attention and norms, no CUDA graphs), as DESIGN's "eager PyTorch is 9.7 ms" was timed.
        with eager_pytorch(gen):
            res = common.time_and_peak(plain_step, device=device)
        row["eager_plain_ms"], row["eager_plain_status"] = res.get("ms"), res["status"]
        if row["plain_ms"] and row["eager_plain_ms"]:
            row["plain_vs_eager"] = row["plain_ms"] / row["eager_plain_ms"]
        choice = step_variant_choice(gen, ("plain",))
        if choice:   # captured with ordinary and programmatic launches (Hopper)
            row["plain_capture_ms"], row["plain_kept"] = choice
        for T, tree in trees.items():
            drafts = torch.randint(0, model.vocab_size, (B, heads - 1, tree.top_k), device=device)
            lengths = seqlens.clone()
            live = torch.ones(B, dtype=torch.bool, device=device)

            def verify_step(tree=tree, drafts=drafts, lengths=lengths):  # as Generator's greedy loop
                lengths.copy_(seqlens)   # compaction advances the lengths: start from kv_len every time
                return gen._verify_step(tokens, drafts, lengths, live, tree, None, False)[2]

            res = common.time_and_peak(verify_step, device=device)
            row[f"verify{T}_ms"] = res.get("ms")
            row[f"verify{T}_status"] = res["status"]
            choice = step_variant_choice(gen, ("verify", tree.size))
            if choice:   # the capture's timings of this step, one per variant
                row[f"verify{T}_capture_ms"], row[f"verify{T}_kept"] = choice
            if device.type == "cuda" and res["status"] == "ok":
                row[f"verify{T}_kernel_ms"] = kernel_breakdown(verify_step)
            if res["status"] == "ok" and row["plain_ms"]:
                row[f"ratio{T}"] = res["ms"] / row["plain_ms"]
                # at the prior acceptance rates: tokens per forward over the step's cost in plain steps
                row[f"expected_tokens{T}"] = expected[T]
                row[f"est_speedup{T}"] = expected[T] / row[f"ratio{T}"]
        row["cuda_graphs"] = gen._use_cuda_graphs()   # False if a capture failed and the steps ran eagerly
        rows.append(row)
        print(f"step costs B={B}: {row}", flush=True)
        gen = None  # drops its CUDA graphs before the next batch size captures its own
        common.free_memory()
    return rows


# ------------------------------------------------------------------------------ end to end
def code_prompts(tokenizer, n: int, prompt_len: int, gen_len: int) -> list:
    """n prompts of prompt_len tokens from held-out standard-library files (the `test/` folders the
    default model never trained on), as `mtp eval` samples them."""
    from mtp_engine.evaluate import heldout_token_stream, sample_prompts

    return sample_prompts(heldout_token_stream(tokenizer, max_files=4 * n), n, prompt_len, gen_len)


@torch.inference_mode()
def end_to_end(model: Transformer, prompts: list, batches, gen_len: int, rows: list, on_batch_done=None,
               tree_rates=None, tree_tokens=(), runs: int = 3) -> list:
    """Greedy generation of exactly gen_len tokens per prompt (eos ignored, so every mode does the
    same work), after a short warm-up call that compiles kernels and captures the CUDA graphs; the
    best of `runs` timed calls (a small model's step is host-bound: single runs on the H100 varied
    by up to 1.5x between sessions), every run's tokens/s kept in the row.
    Modes: plain, chain, the default tree, the heads' fixed preset, and the default tree at each
    budget in `tree_tokens` (Generator.tree_tokens). tree_rates: the checkpoint's measured rates for
    the default tree (None: the priors). Appends to `rows` and calls on_batch_done() after each
    batch size (to save what is measured)."""
    heads = model.n_future_tokens
    spec = {"speculative": "tree", "heads": heads}
    modes = [("plain", {}, None), ("chain", {"speculative": "chain", "heads": heads}, None), ("tree", spec, None),
             (f"tree heads{heads}", {**spec, "tree": default_tree_name(heads)}, None)]
    modes += [(f"tree, {n} tree tokens", spec, n) for n in tree_tokens]
    for B in batches:
        batch = [prompts[i % len(prompts)] for i in range(B)]
        gen = Generator(model, max_batch_size=B, max_seq_len=max(len(p) for p in batch) + gen_len + 1,
                        tree_rates=tree_rates)
        for mode, kwargs, budget in modes:
            gen.tree_tokens = budget
            gen.generate(batch, max_gen_len=min(gen_len, 8), eos_id=-1, **kwargs)   # warm-up (graphs, compiles)
            walls = []
            for _ in range(runs):
                if model.output.weight.is_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                res = gen.generate(batch, max_gen_len=gen_len, eos_id=-1, **kwargs)
                walls.append(time.perf_counter() - start)
            s = res.stats
            rows.append({"batch": B, "mode": mode, "tokens_per_forward": s["tokens_per_forward"],
                         "tokens_per_s": s["generated_tokens"] / min(walls),
                         "tokens_per_s_runs": [s["generated_tokens"] / w for w in walls], "forwards": s["forwards"],
                         "tree_nodes": s.get("tree_nodes", 1), "acceptance_per_depth": s.get("acceptance_per_depth"),
                         "cuda_graphs": gen._use_cuda_graphs()})
        plain = next(r for r in rows if r["batch"] == B and r["mode"] == "plain")
        for r in rows:
            if r["batch"] == B:
                r["speedup"] = r["tokens_per_s"] / plain["tokens_per_s"]
        print(f"end to end B={B}: {[r for r in rows if r['batch'] == B]}", flush=True)
        gen = None  # drops its CUDA graphs before the next batch size captures its own
        common.free_memory()
        if on_batch_done:
            on_batch_done()
    return rows


def attention_path(model: Transformer, device: torch.device, dtype: torch.dtype) -> str:
    """Which KV-cache attention the model's decode and verify steps run: the Triton kernel, or the
    reference for head dims or dtypes the kernel does not take (the numbers then are not the kernel's)."""
    from mtp_kernels.attention import _kernel_supports

    head_dim = model.params.head_dim
    q = torch.empty(1, 1, model.params.n_heads, head_dim, device=device, dtype=dtype)
    if device.type == "cuda" and _kernel_supports(q):
        return f"Triton KV-cache kernel (head dim {head_dim})"
    return f"reference attention (head dim {head_dim}, {str(dtype).replace('torch.', '')}, {device.type})"


# ------------------------------------------------------------------------------ report
def to_markdown(result: dict) -> str:
    eager = [f"step costs at batch {r['batch']}" for r in result.get("step_costs", []) if r.get("cuda_graphs") is False]
    eager += [f"{r['mode']} at batch {r['batch']}" for r in result.get("end_to_end", []) if r.get("cuda_graphs") is False]
    graphs = str(result["cuda_graphs"]) + (f" (a capture failed during these, which ran eagerly from then on: "
                                           f"{', '.join(eager)})"
                                           if result["cuda_graphs"] and eager else "")
    lines = [f"# Self-speculative generation on {result['env']['device']}", "",
             f"Model for step costs: {result['step_model']}; KV length {result['kv_len']}; "
             f"CUDA graphs: {graphs}; attention: {result['step_attention']}.", ""]
    nodes = result["tree_nodes"]
    headers = ["batch", "plain step ms", "bytes floor ms", "x floor", "eager PyTorch ms", "plain / eager"]
    headers += [f"verify {T} nodes / plain" for T in nodes]
    headers += [f"speedup at {PAPER_TOKENS_PER_FORWARD} tok/fwd ({nodes[-1]} nodes)", "kernels per decode forward"]
    rows = []
    for r in result["step_costs"]:
        row = [r["batch"], r["plain_ms"], r.get("plain_floor_ms"), r.get("plain_x_floor"),
               r.get("eager_plain_ms", r.get("eager_plain_status", "-")), r.get("plain_vs_eager")]
        row += [r.get(f"ratio{T}") for T in nodes]
        last = r.get(f"ratio{nodes[-1]}")
        row.append(PAPER_TOKENS_PER_FORWARD / last if last else None)
        kernels = r.get("kernels_per_decode")
        row.append(f"{kernels} ({kernels / r['blocks_per_decode']:.1f} per block)" if isinstance(kernels, int)
                   else kernels if kernels else "-")
        rows.append(row)
    lines += ["## Step costs", "", common.markdown_table(headers, rows), ""]
    if result.get("decode_gemm_launches"):
        lines += ["### Decode GEMM launches (`skinny_linear` tuning: CUDA-graph ms of one call, weight GB/s)", "",
                  common.markdown_table(
                      ["rows (up to)", "N", "K", "cuBLAS ms", "cuBLAS GB/s", "cuBLASLt ms", "cuBLASLt GB/s",
                       "best kernel tile", "kernel ms", "kernel GB/s", "best warp-specialized tile", "ws ms",
                       "ws GB/s", "chosen"],
                      [[r["row_tile"], r["N"], r["K"], r["cublas_ms"], r["cublas_GBps"], r.get("cublaslt_ms"),
                        r.get("cublaslt_GBps"), r["best_tile"], r["kernel_ms"], r["kernel_GBps"],
                        r.get("ws_tile", "-"), r.get("ws_ms"), r.get("ws_GBps"), r["chosen"]]
                       for r in result["decode_gemm_launches"]]), ""]
    unfused_pair = {"swiglu": "the GEMM chosen above, then the swiglu kernel",
                    "rope": "the GEMM chosen above, then the rotary kernel",
                    "swiglu_norm": "add_rms_norm, then the gate/up launch chosen above",
                    "rope_norm": "add_rms_norm, then the q/k/v launch chosen above"}
    for kind, title in (("swiglu", "Gate/up GEMM with SwiGLU in its epilogue (`skinny_linear_swiglu`"),
                        ("rope", "Q/k/v GEMM with rotary and the cache write in its epilogue (`skinny_linear_rope`"),
                        ("swiglu_norm", "Gate/up GEMM with the residual add and norm in its prologue "
                                        "(`skinny_linear_swiglu(norm=...)`"),
                        ("rope_norm", "Q/k/v GEMM with the residual add and norm in its prologue "
                                      "(`skinny_linear_rope(norm=...)`")):
        if result.get(f"{kind}_launches"):
            norm = kind.endswith("_norm")
            lines += [f"### {title} tuning: CUDA-graph ms of one call, weight GB/s; unfused: {unfused_pair[kind]})", "",
                      common.markdown_table(
                          ["rows (up to)", "N", "K", *(["add"] if norm else []), "unfused ms", "unfused GB/s",
                           "best fused tile", "fused ms", "fused GB/s", "chosen"],
                          [[r["row_tile"], r["N"], r["K"], *([r["add"]] if norm else []), r["unfused_ms"],
                            r["unfused_GBps"], r["best_tile"], r["fused_ms"], r["fused_GBps"], r["chosen"]]
                           for r in result[f"{kind}_launches"]]), ""]
    if result.get("select_launches"):
        lines += ["### Token selection launches past 64 rows (`linear_select` tuning: CUDA-graph ms of one call; "
                  "TFLOP/s at the rows tuned for)", "",
                  common.markdown_table(
                      ["rows (up to)", "V", "D", "ranks", "fixed tile", "ms", "chosen", "ms", "TFLOP/s", "all tiles"],
                      [[r["rows"], r["V"], r["D"], r["top_k"], r["fixed_tile"], r["fixed_ms"], r["chosen"],
                        r["chosen_ms"], r["chosen_TFLOPs"], ", ".join(f"{k}: {v:.4g}" for k, v in r["times_ms"].items())]
                       for r in result["select_launches"]]), ""]
    if result.get("kv_launches"):
        lines += ["### KV-cache attention launches (`tune_kv_launch`: CUDA-graph ms of one layer's call, "
                  "cache copies rotated; M = query rows per tile, x = KV splits, +last = the last split combines)", "",
                  common.markdown_table(
                      ["B", "Tq", "H / Hkv", "S_max", "heuristic", "ms", "chosen", "ms", "all candidates"],
                      [[r["B"], r["Tq"], f"{r['H']} / {r['Hkv']}", r["S_max"], r["heuristic"], r["heuristic_ms"],
                        r["chosen"], r["chosen_ms"], ", ".join(f"{k}: {v:.4g}" for k, v in r["times_ms"].items())]
                       for r in result["kv_launches"]]), ""]
    compared = [(r["batch"], T, r[f"verify{T}_capture_ms"], r.get(f"verify{T}_kept"))
                for r in result["step_costs"] for T in nodes if r.get(f"verify{T}_capture_ms")]
    if compared:
        labels = list(dict.fromkeys(label for _, _, ms, _ in compared for label in ms))
        lines += ["### Verify step variants (CUDA-graph captures, timed)", "",
                  "Each greedy verify step is captured once per variant: its head blocks as concurrent graph "
                  "branches (`mtp_engine/branches.py`) or in order, times one read of the unembedding (every "
                  "head scored at every node by `linear_candidates`, the next drafts ranked from those scores) "
                  "or two (head 0 at every node, then the drafting heads at the last accepted node), on Hopper "
                  "each also with its Triton kernels launched programmatically (`kernels/dependent_launch.py`: "
                  "a kernel starts while the one before it ends). Each is timed over 5 replays (median ms) and "
                  "the fastest kept; the step costs above time the kept one. Last columns: the best one-read "
                  "capture over the best two-read one, the best programmatic one over the best ordinary one.", "",
                  common.markdown_table(["batch", "nodes"] + [f"{label} ms" for label in labels]
                                        + ["kept", "one read / two reads", "programmatic / ordinary"],
                                        [[b, T] + [ms.get(label) for label in labels]
                                         + [kept, _read_ratio(ms), _programmatic_ratio(ms)]
                                         for b, T, ms, kept in compared]), ""]
    plain = [r for r in result["step_costs"] if r.get("plain_capture_ms")]
    if plain:
        lines += ["### Plain step launches (CUDA-graph captures, timed)", "",
                  "The plain decode step captured with ordinary launches and with its Triton kernels launched "
                  "programmatically (Hopper), each timed over 5 replays (median ms); the faster is kept.", "",
                  common.markdown_table(["batch", "ordinary launches ms", "programmatic launch ms",
                                         "programmatic / ordinary", "kept"],
                                        [[r["batch"], r["plain_capture_ms"].get("ordinary launches"),
                                          r["plain_capture_ms"].get("programmatic launch"),
                                          _programmatic_ratio(r["plain_capture_ms"]), r["plain_kept"]]
                                         for r in plain]), ""]
    lines += ["### Estimated speedup by tree size", "",
              "Expected tokens per forward at the prior acceptance rates (`speculative.prior_rates`, assumed, "
              "not measured) over the verify step's cost in plain steps: per batch, the largest value marks "
              "the tree size to prefer there (the Generator's default tree keeps at most "
              "`speculative.DEFAULT_TREE_TOKENS` tree tokens per forward).", "",
              common.markdown_table(["batch"] + [f"{T} nodes ({r0:.2f} tok/fwd)" for T, r0 in
                                                 zip(nodes, [result["step_costs"][0].get(f"expected_tokens{T}", 0.0)
                                                             for T in nodes])],
                                    [[r["batch"]] + [r.get(f"est_speedup{T}") for T in nodes]
                                     for r in result["step_costs"]]), ""]
    breakdown = [(r["batch"], step, r[f"{key}_ms"], r[f"{key}_kernel_ms"]) for r in result["step_costs"]
                 for step, key in [("plain", "plain")] + [(f"verify {T}", f"verify{T}") for T in result["tree_nodes"]]
                 if r.get(f"{key}_kernel_ms")]
    if breakdown:
        groups = [g for g, _ in STEP_KERNEL_GROUPS] + ["other"]
        lines += ["### CUDA kernel ms per step, by group (torch.profiler; wall minus kernels = gaps, or overlap "
                  "where it is negative: the concurrent head branches of a verify step)", "",
                  common.markdown_table(["batch", "step", "wall ms", "kernels ms"] + groups,
                                        [[b, step, wall, k["kernels_ms"]] + [k.get(g, 0.0) for g in groups]
                                         for b, step, wall, k in breakdown]), ""]
        lines += ["Largest kernels under \"other\" (ms per step):", ""]
        lines += [f"- batch {b}, {step}: " + (", ".join(f"`{name}` {ms:.4g}" for name, ms in k["other_kernels"].items())
                                              or "none")
                  for b, step, _, k in breakdown if "other_kernels" in k]
        lines += [""]
    lines += [f"## End to end (greedy, {result['gen_len']} new tokens per prompt) on {result['e2e_model']}", "",
              f"Attention: {result['e2e_attention']}.", ""]
    rows = [[r["batch"], r["mode"], r["tree_nodes"], r["tokens_per_forward"], r["tokens_per_s"], r["speedup"],
             " / ".join("-" if a is None else f"{a:.2f}" for a in r["acceptance_per_depth"])
             if r["acceptance_per_depth"] else "-"] for r in result["end_to_end"]]
    lines.append(common.markdown_table(["batch", "mode", "nodes", "tokens/forward", "tokens/s", "speedup",
                                        "acceptance by depth"], rows))
    return "\n".join(lines)


def _read_ratio(variant_ms: dict):
    """Best one-read capture ms over the best two-read one; None unless both were captured."""
    best = {reads: min((ms for label, ms in variant_ms.items() if reads in label), default=None)
            for reads in ("one read", "two reads")}
    return None if None in best.values() else best["one read"] / best["two reads"]


def _programmatic_ratio(variant_ms: dict):
    """Best capture with programmatic launches over the best ordinary one; None unless both ran."""
    programmatic = [ms for label, ms in variant_ms.items() if label.endswith("programmatic launch")]
    ordinary = [ms for label, ms in variant_ms.items() if not label.endswith("programmatic launch")]
    return min(programmatic) / min(ordinary) if programmatic and ordinary else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(common.REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--ckpt-dir", default=None,
                        help="trained MTP checkpoint for end-to-end acceptance (default: mtp_engine/default_model, skipped "
                             "when absent; one named here must exist)")
    parser.add_argument("--tiny", action="store_true", help="tiny fp32 model on the CPU: a check in seconds")
    parser.add_argument("--gen-len", type=common.positive_int, default=None,
                        help="new tokens per prompt (default 128; tiny 8)")
    parser.add_argument("--tree-tokens", type=common.positive_int, nargs="*", default=(),
                        help="also run the default tree at these tree-token budgets per forward (end to end)")
    parser.add_argument("--batches", type=common.positive_int, nargs="+", default=None,
                        help="batch sizes (default 1 8 32 on CUDA, 1 4 on the CPU)")
    args = parser.parse_args()
    if args.ckpt_dir is not None and not (Path(args.ckpt_dir) / "params.json").is_file():
        parser.error(f"--ckpt-dir {args.ckpt_dir}: no params.json there (a typo would measure a random model)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file; it must be a folder")

    tiny = args.tiny or not torch.cuda.is_available()
    if tiny and not args.tiny:
        print("bench_generate: no CUDA device, running the --tiny CPU check")
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    kv_len = 32 if tiny else 1024
    gen_len = args.gen_len or (8 if tiny else 128)
    batches = tuple(args.batches) if args.batches else (1, 4) if tiny else BATCHES

    step_model = random_model(SHAPE_TINY if tiny else SHAPE_7B, device, dtype)
    result = {"env": common.environment_info(device), "step_model": ("tiny random " if tiny else "7B-shaped random ")
              + str(SHAPE_TINY if tiny else SHAPE_7B), "kv_len": kv_len, "tree_nodes": list(TREE_NODES),
              "cuda_graphs": device.type == "cuda", "gen_len": gen_len,
              "step_attention": attention_path(step_model, device, dtype)}
    stem = Path(args.out) / f"generate_{common.device_slug(device)}"

    def save(quiet=True):  # after each part, so a run cut off by its time limit keeps what it measured
        common.write_json(stem.with_suffix(".json"), result)
        text = to_markdown(result)
        common.write_markdown(stem.with_suffix(".md"), text)
        charts.try_chart_for(stem.with_suffix(".json"))
        if not quiet:
            print(text)

    result["step_costs"] = step_costs(step_model, batches, kv_len, TREE_NODES, device)
    result["decode_gemm_launches"] = skinny_launch_report()
    result["swiglu_launches"] = epilogue_launch_report("swiglu")
    result["rope_launches"] = epilogue_launch_report("rope")
    result["swiglu_norm_launches"] = epilogue_launch_report("swiglu_norm")
    result["rope_norm_launches"] = epilogue_launch_report("rope_norm")
    result["select_launches"] = select_launch_report()
    result["kv_launches"] = kv_launch_report()
    result.update(e2e_model="(not measured yet)", e2e_attention="-", end_to_end=[])
    save()

    e2e_model, prompts, label, tree_rates = step_model, None, result["step_model"], None
    ckpt = Path(args.ckpt_dir or common.REPO_ROOT / "mtp_engine" / "default_model")
    if (ckpt / "params.json").is_file():
        from mtp_engine.checkpoint import load_checkpoint
        from mtp_engine.tokenizer import Tokenizer

        del step_model
        common.free_memory()
        e2e_model = load_checkpoint(ckpt, device=device, dtype=dtype).eval()
        tokenizer = Tokenizer(str(ckpt / "tokenizer.model"))
        prompts = code_prompts(tokenizer, 32, 64, gen_len)
        tree_rates = read_tree_rates(ckpt, e2e_model.n_future_tokens)
        label = f"trained checkpoint {ckpt}"
    if not prompts:
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, e2e_model.vocab_size, (n,), generator=g).tolist() for n in (16, 23, 31, 40)]
    result["e2e_model"] = label
    result["e2e_attention"] = attention_path(e2e_model, device, dtype)
    end_to_end(e2e_model, prompts, batches, gen_len, result["end_to_end"], on_batch_done=save, tree_rates=tree_rates,
               tree_tokens=tuple(args.tree_tokens))
    save(quiet=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Spawned workers for tests/test_distributed.py: 2 CPU processes on the gloo backend.

`run_on_ranks(scenario, tmp_dir, **kwargs)` starts `world_size` processes (torch.multiprocessing,
spawn), each sets torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT on a free port), calls `mtp_engine.distributed.init_distributed("cpu")`, runs
`SCENARIOS[scenario](env, **kwargs)` and saves what it returns to `tmp_dir/rank{r}.pt`. The parent
returns the list of per-rank results, or raises with the failing rank's traceback; processes still
running after `timeout` seconds are killed and the test fails instead of hanging.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

IGNORE = -100


# ------------------------------------------------------------------------------------ spawning
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, scenario: str, out_dir: str, device: str, kwargs: dict) -> None:
    torch.set_num_threads(1)  # 2 ranks on a shared 2-core machine
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from mtp_engine.distributed import cleanup, init_distributed

    env = init_distributed(device, timeout=datetime.timedelta(seconds=60))
    try:
        result = SCENARIOS[scenario](env, **kwargs)
        torch.save(_to_cpu(result), Path(out_dir) / f"rank{rank}.pt")
    finally:
        cleanup(env)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def run_on_ranks(scenario: str, out_dir, world_size: int = 2, timeout: float = 120.0, device: str = "cpu",
                 **kwargs) -> list:
    """Run SCENARIOS[scenario](env, **kwargs) on `world_size` ranks (gloo on "cpu", nccl on "cuda":
    one GPU per rank); returns the per-rank results, moved to the CPU."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_entry, args=(world_size, free_port(), scenario, str(out_dir), device, kwargs),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):  # raises ProcessRaisedException / ProcessExitedException on failure
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"scenario {scenario!r} did not finish within {timeout:.0f} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


# ------------------------------------------------------------------------------------ shared builders
def tiny_args(**overrides):
    from mtp_engine.model import ModelArgs

    cfg = dict(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=67, multiple_of=16, n_future_tokens=2,
               max_seq_len=32, max_batch_size=2)
    cfg.update(overrides)
    return ModelArgs(**cfg)


def tiny_model(seed: int = 0, **overrides):
    from mtp_engine.model import Transformer

    torch.manual_seed(seed)
    model = Transformer(tiny_args(**overrides))
    with torch.no_grad():  # nn.Linear's default init is tiny for these sizes: make the logits matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model


def train_model(model):
    """train.py's MTPTrainModel around `model`: forward(tokens) -> MTPLossOutput, reading
    output.weight inside forward."""
    from mtp_engine.train import MTPTrainModel

    return MTPTrainModel(model)


def train_batch(batch: int = 4, seq: int = 9, vocab: int = 67, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


TRAIN_STEPS = 2
LR = 1e-2


def make_optimizer(params):
    # eps well above fp32 rounding of the gradients: Adam divides by sqrt(v) + eps, and with the
    # default 1e-8 a gradient entry near 0 turns a 1e-9 summation-order difference (two ranks vs
    # one batch) into a full lr-sized step in either direction.
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.1, eps=1e-4)


def vp_inputs(n, N, D, V, seed=0, ignore_frac=0.25):
    """hidden (n, N, D), weight (V, D), targets (n, N) with some ignored entries; float32."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, N, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D ** 0.5
    targets = torch.randint(0, V, (n, N), generator=g)
    targets[torch.rand(n, N, generator=g) < ignore_frac] = IGNORE
    return hidden, weight, targets


# Vocabulary-parallel cases: shapes, how V is split over the 2 ranks, options, backend.
VP_CASES = {
    "n4_uneven_mean_chunks": dict(n=4, N=13, D=16, V=1001, split=(600, 401), budget_rows=8, opts={}),
    "n1_single_head_sum": dict(n=1, N=11, D=16, V=1001, split=(501, 500), budget_rows=4, single=True,
                               opts={"reduction": "sum"}),
    "n4_none_all_options": dict(n=4, N=7, D=8, V=1001, split=(333, 668), budget_rows=5,
                                opts={"reduction": "none", "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 4.0,
                                      "head_weights": [1.0, 0.5, 0.25, 2.0]}),
    "n4_mean_smoothing_zloss": dict(n=4, N=9, D=8, V=1001, split=(700, 301), budget_rows=64,
                                    opts={"label_smoothing": 0.05, "z_loss": 1e-3, "head_weights": [1, 1, 0.5, 0.5]}),
    "n2_triton_softcap": dict(n=2, N=5, D=8, V=203, split=(120, 83), budget_rows=3, backend="triton",
                              opts={"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0}),
    "n2_triton_none": dict(n=2, N=4, D=8, V=130, split=(65, 65), budget_rows=64, backend="triton",
                           opts={"reduction": "none"}),
    "all_ignored": dict(n=2, N=5, D=8, V=101, split=(51, 50), budget_rows=64, ignore_frac=1.0, opts={}),
    # float32 inputs, bf16 matmuls: the shards' dH partials round differently from one GEMM's dH.
    "n4_autocast_bf16": dict(n=4, N=13, D=16, V=1001, split=(600, 401), budget_rows=8, autocast=torch.bfloat16,
                             rtol=2e-2, opts={"z_loss": 1e-3}),
}


def vp_autocast(case, device_type: str = "cpu"):
    """The case's autocast context (a no-op for cases without one)."""
    dtype = case.get("autocast")
    return torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()


def vp_shard_bounds(split, rank):
    start = sum(split[:rank])
    return start, start + split[rank]


def vp_grad_out(case, shape):
    """The upstream gradient used for case `case`: a fixed scalar, or a random (n, N) for "none"."""
    if case["opts"].get("reduction") == "none":
        return torch.randn(shape, generator=torch.Generator().manual_seed(7))
    return torch.tensor(1.7)


# ------------------------------------------------------------------------------------ scenarios
def scenario_train(env, strategies, mixed_precision=None):
    """TRAIN_STEPS AdamW steps per strategy; rank r takes rows [r*B/W, (r+1)*B/W) of each batch."""
    from mtp_engine.distributed import (find_transformer, full_optimizer_state, full_state_dict,
                                        gathered_parameters, load_optimizer_state, unwrap, wrap_for_training)

    results = {}
    for strategy in strategies:
        # Rank 1 starts from different weights on purpose: wrap_for_training must broadcast rank 0's.
        module = train_model(tiny_model(seed=0 if env.rank == 0 else 123))
        wrapped = wrap_for_training(module, strategy, env, mixed_precision=mixed_precision)
        optimizer = make_optimizer(wrapped.parameters())
        output_grads, losses = [], []
        for step in range(TRAIN_STEPS):
            tokens = train_batch(seed=1 + step).to(env.device)
            per_rank = tokens.shape[0] // env.world_size
            out = wrapped(tokens[env.rank * per_rank:(env.rank + 1) * per_rank])
            out.loss.backward()
            grad = find_transformer(unwrap(wrapped)).output.weight.grad
            output_grads.append((grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone())
            losses.append(out.loss.detach().clone())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # Evaluation calls the Transformer directly, outside the wrapper's forward.
        with torch.no_grad(), gathered_parameters(wrapped, strategy, env):
            model = find_transformer(unwrap(wrapped))
            eval_logits = model.head_hidden(train_batch(batch=2, seed=9).to(env.device))[0] @ model.output.weight.t()
        state = full_state_dict(wrapped, strategy, env)
        optim_state = full_optimizer_state(wrapped, optimizer, strategy, env)
        # Round trip: load the full optimizer state into a fresh optimizer over the same shards.
        fresh = make_optimizer(wrapped.parameters())
        load_optimizer_state(wrapped, fresh, optim_state, strategy, env)
        reloaded = full_optimizer_state(wrapped, fresh, strategy, env)
        # The same state keyed by index, as a one-process run saves it, loads under every strategy too.
        index_keyed = None
        if env.is_main:
            index_of = {name: i for i, name in enumerate(n for g in optim_state["param_groups"] for n in g["params"])}
            index_keyed = {"state": {index_of[n]: s for n, s in optim_state["state"].items()},
                           "param_groups": [{**g, "params": [index_of[n] for n in g["params"]]}
                                            for g in optim_state["param_groups"]]}
        from_index = make_optimizer(wrapped.parameters())
        load_optimizer_state(wrapped, from_index, index_keyed, strategy, env)
        reloaded_from_index = full_optimizer_state(wrapped, from_index, strategy, env)
        results[strategy] = dict(state=state, optim_state=optim_state, reloaded=reloaded, eval_logits=eval_logits,
                                 output_grads=output_grads, losses=losses, reloaded_from_index=reloaded_from_index)
    return results


def scenario_vocab_parallel(env, cases, backend=None):
    """backend: force "triton" / "reference" for every case (default: each case's own, reference on CPU)."""
    import torch.distributed as dist

    from mtp_kernels import fused_linear_cross_entropy

    results = {}
    for name in cases:
        case = VP_CASES[name]
        os.environ["MTP_BACKEND"] = backend or case.get("backend", "reference")
        hidden, weight, targets = (t.to(env.device) for t in vp_inputs(
            case["n"], case["N"], case["D"], case["V"], ignore_frac=case.get("ignore_frac", 0.25)))
        if case.get("single"):
            hidden, targets = hidden[0], targets[0]
        lo, hi = vp_shard_bounds(case["split"], env.rank)
        h = hidden.clone().requires_grad_()
        w = weight[lo:hi].clone().requires_grad_()
        budget = case["budget_rows"] * max(case["split"]) * 4
        with vp_autocast(case, env.device.type):
            loss, per_head = fused_linear_cross_entropy(h, w, targets, process_group=dist.group.WORLD,
                                                        max_scratch_bytes=budget, return_per_head=True, **case["opts"])
        loss.backward(vp_grad_out(case, loss.shape).to(env.device))
        with torch.no_grad(), vp_autocast(case, env.device.type):
            eval_loss = fused_linear_cross_entropy(hidden, weight[lo:hi], targets, process_group=dist.group.WORLD,
                                                   max_scratch_bytes=budget, **case["opts"])
        results[name] = dict(loss=loss.detach(), per_head=per_head, eval_loss=eval_loss, hidden_grad=h.grad,
                             weight_grad=w.grad)
    os.environ.pop("MTP_BACKEND", None)
    return results


def autocast_if(on: bool, call):
    """call() under CPU bf16 autocast where `on`, plainly elsewhere."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
        return call()


def scenario_vocab_parallel_errors(env):
    """Bad input must raise the same ValueError on every rank (no rank left waiting in a collective)."""
    import torch.distributed as dist

    from mtp_kernels import fused_linear_cross_entropy

    hidden, weight, targets = vp_inputs(2, 5, 8, 101)
    shard = weight[:51] if env.rank == 0 else weight[51:]
    messages = {}
    bad_targets = targets.clone()
    bad_targets[1, 2] = 101  # valid for no rank: the global vocabulary is [0, 101)
    cases = {
        "token_out_of_range": lambda: fused_linear_cross_entropy(hidden, shard, bad_targets,
                                                                 process_group=dist.group.WORLD),
        "rows_differ": lambda: fused_linear_cross_entropy(hidden[:, : 4 + env.rank], shard,
                                                          targets[:, : 4 + env.rank], process_group=dist.group.WORLD),
        "empty_shard": lambda: fused_linear_cross_entropy(hidden, weight[:0] if env.rank == 1 else weight, targets,
                                                          process_group=dist.group.WORLD),
        # refused by rank 1's own checks only: rank 0 must not wait in a collective for it
        "one_rank_dtype": lambda: fused_linear_cross_entropy(hidden, shard.bfloat16() if env.rank == 1 else shard,
                                                             targets, process_group=dist.group.WORLD),
        "one_rank_width": lambda: fused_linear_cross_entropy(hidden, shard[:, :7] if env.rank == 1 else shard,
                                                             targets, process_group=dist.group.WORLD),
        # each rank consistent, the ranks not: other chunk sizes, other collectives
        "dtypes_differ": lambda: fused_linear_cross_entropy(*((hidden.bfloat16(), shard.bfloat16()) if env.rank == 1
                                                              else (hidden, shard)), targets,
                                                            process_group=dist.group.WORLD),
        "grads_differ": lambda: fused_linear_cross_entropy(hidden.clone().requires_grad_(env.rank == 0), shard,
                                                           targets, process_group=dist.group.WORLD),
        "autocast_one_rank": lambda: autocast_if(env.rank == 1, lambda: fused_linear_cross_entropy(
            hidden, shard, targets, process_group=dist.group.WORLD)),
        "scratch_differs": lambda: fused_linear_cross_entropy(hidden, shard, targets, process_group=dist.group.WORLD,
                                                              max_scratch_bytes=4096 * (1 + env.rank)),
        "targets_bad_one_rank": lambda: fused_linear_cross_entropy(
            hidden, shard, bad_targets.fill_(1000000) if env.rank == 1 else targets, process_group=dist.group.WORLD),
        "one_rank_head_weights": lambda: fused_linear_cross_entropy(
            hidden, shard, targets, head_weights=[1.0, 1.0, 1.0] if env.rank == 1 else None,
            process_group=dist.group.WORLD),
        "one_rank_not_tensors": lambda: fused_linear_cross_entropy(
            *((None, None) if env.rank == 1 else (hidden, shard)), targets, process_group=dist.group.WORLD),
    }
    for name, call in cases.items():
        try:
            call()
            messages[name] = None
        except ValueError as e:
            messages[name] = str(e)
    # A token id in the other rank's range is fine (it is a real token, just not this shard's).
    ok = fused_linear_cross_entropy(hidden, shard, targets, process_group=dist.group.WORLD)
    messages["ok_loss"] = float(ok)
    both = (hidden.bfloat16(), shard.bfloat16()) if env.rank == 1 else (hidden, shard)
    messages["both_bf16_compute"] = float(autocast_if(env.rank == 0, lambda: fused_linear_cross_entropy(
        *both, targets, process_group=dist.group.WORLD)))
    # An fp16 logit past the range (-inf) without label smoothing: its exp is 0 and the loss finite
    # (the smoothing term's 0 * -inf had made it NaN), as in one process.
    far = weight.clone()
    far[3] = -8000.0
    positive = hidden.abs() + 0.5
    local = far[:51] if env.rank == 0 else far[51:]
    messages["neg_inf_loss"] = float(fused_linear_cross_entropy(positive.half(), local.half(), targets.clamp(min=4),
                                                                process_group=dist.group.WORLD))
    messages["neg_inf_single"] = float(fused_linear_cross_entropy(positive.half(), far.half(), targets.clamp(min=4)))
    return messages


def scenario_tensor_parallel(env, ckpt_dir, prompts, max_gen_len, speculative_modes, dtype=None):
    from mtp_engine import tensor_parallel
    from mtp_engine.generate import Generator

    files_read = []
    load_shard = tensor_parallel._load_shard

    def recording_load_shard(path):
        files_read.append(path.name)
        return load_shard(path)

    tensor_parallel._load_shard = recording_load_shard  # this process only
    model = tensor_parallel.load_tensor_parallel(ckpt_dir, env, dtype=dtype)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    gen = Generator(model, max_batch_size=len(prompts), max_seq_len=64)
    tokens = {}
    for mode in speculative_modes:
        res = gen.generate(prompts, max_gen_len=max_gen_len, temperature=0.0, speculative=mode)
        tokens[mode or "plain"] = res.tokens
    # one cache row: the second prompt starts with the first, whose slots it keeps (a shared prefix)
    shared = Generator(model, max_batch_size=1, max_seq_len=64).generate([prompts[0], prompts[0] + [7]],
                                                                         max_gen_len=max_gen_len)
    tokens["shared prefix"] = shared.tokens
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0]], device=env.device), return_all_heads=True)
    return dict(tokens=tokens, shapes=shapes, logits=logits, files_read=files_read,
                concurrent_heads=model.concurrent_heads, shared_prompt_tokens=shared.stats["shared_prompt_tokens"])


SCENARIOS = {
    "train": scenario_train,
    "vocab_parallel": scenario_vocab_parallel,
    "vocab_parallel_errors": scenario_vocab_parallel_errors,
    "tensor_parallel": scenario_tensor_parallel,
}

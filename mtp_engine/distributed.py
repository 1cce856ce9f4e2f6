"""Data-parallel training on torch.distributed: process set-up, DDP / FSDP2 wrapping, full state dicts.

Launched with torchrun, every process calls

    env = init_distributed()                        # reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    wrapped = wrap_for_training(train_model, "fsdp", env)   # "none" | "ddp" | "fsdp"
    out = wrapped(tokens); out.loss.backward(); optimizer.step()
    state = full_state_dict(wrapped, "fsdp", env)   # collective; the Transformer's full CPU state on rank 0
    if env.is_main: save(state)
    cleanup(env)

Without torchrun (WORLD_SIZE unset or 1) the same calls run a single process with no process group,
so one training script serves both cases.

`train_model` is any nn.Module holding the `Transformer` (as `.model`, or being it) whose forward
reads `model.output.weight` inside its own forward: FSDP2's root pre-forward all-gather then covers
the shared unembedding, and the fused loss's gradient reaches the real (sharded) parameter.

Code that calls the Transformer directly instead of `wrapped(tokens)` (evaluation) runs inside
`with gathered_parameters(wrapped, strategy, env):` so FSDP2's root parameters are gathered.

Collectives (`full_state_dict`, `full_optimizer_state`, `load_optimizer_state`, `gathered_parameters`,
`all_reduce_mean`, `barrier`) must be called by every rank.
"""
from __future__ import annotations

import datetime
import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from .model import Transformer

STRATEGIES = ("none", "ddp", "fsdp")
# A hung peer (crashed rank, wrong MASTER_ADDR) fails the collectives after this long instead of forever.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class DistEnv:
    """Where this process sits. Single-process runs have rank 0, world_size 1, is_main True."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one rank is in use."""
        return self.world_size > 1

    @property
    def backend(self) -> Optional[str]:
        """"nccl" / "gloo" of the default process group, None for a single process."""
        return dist.get_backend() if self.distributed else None


# ------------------------------------------------------------------------------------ set-up
def _env_int(name: str, default: Optional[int] = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"environment variable {name} is not set (launch with torchrun, which sets "
                             "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _pick_device(device: Optional[str], local_rank: int) -> torch.device:
    """`device` None -> cuda:local_rank when CUDA is available, else cpu; "cuda" -> cuda:local_rank."""
    from .checkpoint import resolve_device

    dev = resolve_device(device)   # the rule every command uses for names and CUDA without CUDA
    if dev.type == "cuda":
        if dev.index is None:
            count = torch.cuda.device_count()
            if local_rank >= count:
                raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: this node has {count} "
                                 f"(use --nproc_per_node <= {count})")
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    return dev


def init_distributed(device: Optional[str] = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> DistEnv:
    """Set up this process from torchrun's environment and return its `DistEnv`.

    WORLD_SIZE unset or 1: a single process, no process group. Otherwise the default process group
    is initialized from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (env://) with backend "nccl"
    on CUDA and "gloo" on CPU; the CUDA device is cuda:LOCAL_RANK. A process group that already
    exists (initialized by the caller) is reused if its size and rank match the environment.
    device: None (CUDA if available, else CPU), "cpu" or "cuda".
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if world_size == 1:
        local_rank = _env_int("LOCAL_RANK", 0)
        return DistEnv(rank=0, world_size=1, local_rank=local_rank, device=_pick_device(device, local_rank),
                       is_main=True)

    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK {rank} is outside [0, WORLD_SIZE={world_size})")
    dev = _pick_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise ValueError(f"a process group is already initialized with rank {dist.get_rank()} of "
                             f"{dist.get_world_size()}, but the environment says rank {rank} of {world_size}")
    else:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise ValueError(f"WORLD_SIZE={world_size} but {name} is not set (launch with torchrun)")
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, is_main=rank == 0)


def cleanup(env: DistEnv) -> None:
    """Destroy the default process group (if one exists). Safe to call more than once."""
    if env.distributed and dist.is_initialized():
        # Objects caught in reference cycles (a model with its collective hooks, a Generator) must go
        # while the group still exists: freed later, at interpreter teardown, they aborted the process
        # ("terminate called without an active exception") about one run in three.
        gc.collect()
        # Every rank reaches this point before any tears the group down.
        dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op for a single process)."""
    if not env.distributed:
        return
    if env.device.type == "cuda":
        dist.barrier(device_ids=[env.device.index])
    else:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of `t` over all ranks, for logging. Returns a new detached tensor on t's device and dtype
    (the reduction runs in float32 on env.device, which NCCL needs)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"all_reduce_mean takes a tensor, got {type(t).__name__}")
    if not env.distributed:
        return t.detach().clone()
    buf = t.detach().to(device=env.device, dtype=torch.float32).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return (buf / env.world_size).to(device=t.device, dtype=t.dtype)


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when `flag` is True on at least one (a decision all ranks must share, such as
    stopping: a rank that left alone would leave the others waiting in a collective)."""
    if not env.distributed:
        return bool(flag)
    buf = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return bool(buf.item())


# ------------------------------------------------------------------------------------ wrapping
def find_transformer(module: nn.Module) -> Transformer:
    """The `Transformer` inside `module` (module itself, `.model`, or the first one found)."""
    if isinstance(module, Transformer):
        return module
    inner = getattr(module, "model", None)
    if isinstance(inner, Transformer):
        return inner
    for sub in module.modules():
        if isinstance(sub, Transformer):
            return sub
    raise ValueError(f"{type(module).__name__} holds no mtp_engine Transformer")


def _check_strategy(strategy: str, env: DistEnv) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "none" and env.distributed:
        raise ValueError(f"strategy 'none' with world_size {env.world_size} would train {env.world_size} "
                         "independent replicas; use 'ddp' or 'fsdp'")


def _broadcast_from_rank0(module: nn.Module) -> None:
    """Make every rank start from rank 0's weights (a rank seeded differently would silently diverge)."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)


def wrap_for_training(module: nn.Module, strategy: str, env: DistEnv, *,
                      mixed_precision: Optional[bool] = None) -> nn.Module:
    """Wrap `module` (holding the Transformer) for data-parallel training; returns the module to call.

    strategy:
      "none": the module itself, moved to env.device (single process only).
      "ddp":  DistributedDataParallel: full replica per rank, gradients all-reduced (averaged).
      "fsdp": FSDP2 `fully_shard` on every TransformerBlock of `model.blocks()`, then on the root
              (tok_embeddings, norm and output are sharded by the root and gathered in its pre-forward).
              mixed_precision (default: on for CUDA) computes with bf16 parameters and reduces
              gradients in fp32; the sharded parameters the optimizer sees stay in their own dtype.
    Weights are broadcast from rank 0 first, so ranks need not be seeded alike. With one process,
    "ddp" and "fsdp" return the module unwrapped (nothing to synchronize).
    The optimizer must be built from the returned module's parameters (FSDP2 replaces them by shards).
    """
    _check_strategy(strategy, env)
    find_transformer(module)  # fail early on a module without the model
    module = module.to(env.device)
    if not env.distributed:
        return module
    _broadcast_from_rank0(module)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed_precision is None:
        mixed_precision = env.device.type == "cuda"
    mp_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                 if mixed_precision else MixedPrecisionPolicy())
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for block in find_transformer(module).blocks():
        fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    fully_shard(module, mesh=mesh, mp_policy=mp_policy)
    return module


@contextmanager
def gathered_parameters(module: nn.Module, strategy: str, env: DistEnv):
    """Inside the block, code may call the Transformer's methods directly (evaluation:
    `model.head_hidden(tokens)`, `model.output.weight`) rather than the wrapped module's forward.

    Under FSDP2 the root's own parameters (tok_embeddings, norm, output) are all-gathered on entry
    and resharded on exit; the blocks gather theirs in their own forward hooks. A no-op for "none"
    and "ddp". Collective under "fsdp": every rank must enter it. Use it under torch.no_grad().
    """
    _check_strategy(strategy, env)
    if strategy != "fsdp" or not env.distributed:
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are their own wrapper)."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


# ------------------------------------------------------------------------------------ state dicts
def _state_dict_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def _transformer_prefix(module: nn.Module) -> str:
    """The key prefix of the Transformer's entries in `unwrap(module)`'s state dict ("" or "model.")."""
    root = unwrap(module)
    target = find_transformer(root)
    for name, sub in root.named_modules():
        if sub is target:
            return f"{name}." if name else ""
    raise ValueError("the Transformer is not a submodule of the module")  # unreachable after find_transformer


def full_state_dict(module: nn.Module, strategy: str, env: DistEnv) -> Optional[Dict[str, torch.Tensor]]:
    """The Transformer's full (unsharded) CPU state dict with Meta's key names, on rank 0.

    Returns None on the other ranks. Collective under "fsdp" (parameters are all-gathered): every
    rank must call it. The dict feeds `save_checkpoint` via `load_state_dict` on a Transformer.
    """
    _check_strategy(strategy, env)
    prefix = _transformer_prefix(module)
    if strategy == "fsdp" and env.distributed:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        # Rank 0 receives the gathered tensors on CPU; the other ranks get an empty dict.
        state = get_model_state_dict(module, options=_state_dict_options(full_state_dict=True, cpu_offload=True))
    else:
        state = unwrap(module).state_dict() if env.is_main else None
    if not env.is_main:
        return None
    return {key[len(prefix):]: tensor.detach().to("cpu", copy=True)
            for key, tensor in state.items() if key.startswith(prefix)}


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, strategy: str,
                         env: DistEnv) -> Optional[dict]:
    """The optimizer's full state on CPU, keyed by parameter name (not index), on rank 0; None elsewhere.

    Names are those of the unwrapped module (e.g. "model.layers.0.attention.wq.weight"), so a state
    saved under one strategy or world size loads under another. Collective under "fsdp".
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    _check_strategy(strategy, env)
    options = _state_dict_options(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(module, optimizer, options=options)
    return state if env.is_main else None


def name_keyed_optimizer_state(state: dict, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`state` keyed by parameter name, as `full_optimizer_state` keys it. A state keyed by index
    (`optimizer.state_dict()`, what a one-process run saves) names index i after the i-th parameter
    of `optimizer`'s groups, which must be built as the saving run built its optimizer (same module,
    same grouping); one keyed by name is returned as it is. (torch's set_optimizer_state_dict would
    file index keys under no parameter and start AdamW's moments from zero without a word.)"""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not isinstance(state.get("state"), dict):
        raise ValueError(f"optimizer state must be a dict with 'state' and 'param_groups', got "
                         f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
    saved = [i for g in groups for i in g["params"]]
    if not saved or not all(isinstance(i, int) for i in saved):
        return state
    names = {id(p): n for n, p in unwrap(module).named_parameters()}
    current = [names.get(id(p)) for g in optimizer.param_groups for p in g["params"]]
    if None in current:
        raise ValueError("optimizer state keyed by index: the optimizer holds parameters that are not the module's")
    saved_sizes = [len(g["params"]) for g in groups]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != sizes:
        raise ValueError(f"optimizer state keyed by index has groups of {saved_sizes} parameters; this model's "
                         f"optimizer has {sizes}: not the same model")
    name_of = dict(zip(saved, current))
    return {"state": {name_of[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in groups]}


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: Optional[dict],
                         strategy: str, env: DistEnv) -> None:
    """Load a `full_optimizer_state` result into `optimizer` (built on the wrapped module).

    Distributed: only rank 0 needs the state (others may pass None); it is broadcast and each rank
    keeps its shard. Collective: every rank must call it. A state keyed by index (what a one-process
    run saves, `optimizer.state_dict()`) is keyed by name first (`name_keyed_optimizer_state`).
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    _check_strategy(strategy, env)
    if env.is_main and state is None:
        raise ValueError("load_optimizer_state: rank 0 must pass the optimizer state, got None")
    if state is not None:
        state = name_keyed_optimizer_state(state, module, optimizer)
    if env.distributed:
        options = _state_dict_options(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=state if env.is_main else {}, options=options)
    else:
        # One process: the full state is the local one (full_state_dict=True would look for the
        # device of state tensors that a fresh optimizer does not have yet).
        set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=_state_dict_options())


__all__ = ["DistEnv", "init_distributed", "wrap_for_training", "gathered_parameters", "full_state_dict",
           "full_optimizer_state", "name_keyed_optimizer_state",
           "load_optimizer_state", "all_reduce_mean", "barrier", "cleanup", "find_transformer", "unwrap",
           "STRATEGIES"]

"""Load and save checkpoints in Meta's layout: `params.json` + `consolidated.NN.pth` shards.

Several shards are Meta's model-parallel split (fairscale): column-parallel weights are cut on
dim 0, row-parallel weights and `tok_embeddings` on dim 1, norms are replicated in every shard.
Loading builds the model on the meta device and assigns the (memory-mapped) tensors, so a 7B
checkpoint is read into RAM once, never twice.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from .model import ModelArgs, Transformer, precompute_freqs_cis

PathLike = Union[str, os.PathLike]

SHARD_PATTERN = re.compile(r"^consolidated\.(\d+)\.pth$")
# Keys some Meta checkpoints carry that the model recomputes (rotary table): dropped on load.
IGNORED_KEYS = frozenset({"rope.freqs"})

# Split dim per parameter name suffix; None = replicated.
_COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                    "feed_forward.w1.weight", "feed_forward.w3.weight")
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")
_REPLICATED = ("attention_norm.weight", "ffn_norm.weight")
_BLOCK_KEY = re.compile(r"^(layers|extra_heads)\.(\d+)\.(.+)$")

# params.json fields Meta writes (the generation-time sizes max_batch_size/max_seq_len are not among them).
PARAMS_JSON_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                      "ffn_dim_multiplier", "norm_eps", "rope_theta", "n_future_tokens")


_REQUIRED_PARAMS = ("dim", "n_layers", "n_heads")


def shard_dim(key: str) -> Optional[int]:
    """Dim along which Meta's model parallelism splits `key` (0 or 1), or None if replicated."""
    if key == "output.weight":
        return 0
    if key == "tok_embeddings.weight":
        return 1
    if key == "norm.weight":
        return None
    m = _BLOCK_KEY.match(key)
    if m:
        suffix = m.group(3)
        if suffix in _COLUMN_PARALLEL:
            return 0
        if suffix in _ROW_PARALLEL:
            return 1
        if suffix in _REPLICATED:
            return None
    raise KeyError(key)


# ------------------------------------------------------------------------------------ loading
def resolve_device(device=None) -> torch.device:
    """None -> cuda when available, else cpu. A name torch does not know, or cuda on a machine
    without it, is a ValueError before any file is read."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available on this machine "
                         f"(torch {torch.__version__})")
    return device


def load_checkpoint(ckpt_dir: PathLike, device: Union[str, torch.device] = "cpu",
                    dtype: Optional[torch.dtype] = None, max_seq_len: Optional[int] = None,
                    max_batch_size: Optional[int] = None) -> Transformer:
    """Build a `Transformer` from a Meta-layout checkpoint directory.

    dtype: cast every floating parameter to it (None keeps the checkpoint's dtype, bf16 for Meta's).
    max_seq_len / max_batch_size: override the generation-time sizes (they are not in params.json);
    the rotary table covers 2 * max_seq_len positions as in the release.
    On CPU with one shard and no cast, parameters stay memory-mapped from the shard file (private
    mapping: in-place updates never reach the file; `save_checkpoint` replaces files, never rewrites them).
    Raises FileNotFoundError for a missing directory, params.json or shard, ValueError for a
    checkpoint that does not match its params.json (the message names the file and key).
    """
    ckpt_dir, params_path, params = read_params(ckpt_dir, dtype, max_seq_len, max_batch_size)
    device = resolve_device(device)
    shard_paths = find_shards(ckpt_dir)
    shards = [_load_shard(p) for p in shard_paths]
    _check_consistent_keys(shards, shard_paths)

    source = params_path.name
    if params_vocab_size(params, params_path) is None:
        # Meta's params.json says -1 (the vocab comes from the tokenizer); the weights know it.
        params["vocab_size"] = _vocab_from_shards(shards, params_path)
        source += f" (vocab_size {params['vocab_size']} from the weights)"
    args = ModelArgs.from_dict(params, source=str(params_path))

    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_head_count(args, shards[0], params_path, shard_paths[0])
    _check_key_sets(expected, shards[0], shard_paths)

    state = {}
    for key, shape in expected.items():
        tensor = _merge(key, [s[key] for s in shards], shard_paths, dtype)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{key}: expected shape {shape} from {source}, got {tuple(tensor.shape)}"
                             + (f" after merging {len(shards)} shards" if len(shards) > 1 else "")
                             + f" in {ckpt_dir}" + _missing_shard_hint(key, tuple(tensor.shape), shape, len(shards)))
        # dtype= casts floating weights only: an integer (quantized) weight must reach the check as one
        state[key] = tensor.to(device=device, dtype=dtype if dtype and tensor.is_floating_point() else tensor.dtype)
    del shards
    check_weight_dtypes(state, ckpt_dir)
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers were built on the meta device; recompute them for real.
    model.freqs_cis = precompute_freqs_cis(args.head_dim, args.max_seq_len * 2, args.rope_theta).to(device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a new parameter or buffer in Transformer that this loader does not know about
        raise RuntimeError(f"load_checkpoint left tensors on the meta device: {leftover}")
    return model


def read_params(ckpt_dir: PathLike, dtype: Optional[torch.dtype], max_seq_len: Optional[int],
                max_batch_size: Optional[int]):
    """A loader's first steps (load_checkpoint, tensor_parallel.load_tensor_parallel): the directory
    and dtype checked, params.json read, the generation-time sizes given (they are not in it) set.
    Returns (ckpt_dir Path, params_path, params dict)."""
    if not isinstance(ckpt_dir, (str, os.PathLike)):
        raise ValueError(f"ckpt_dir must be a checkpoint folder's path, got {type(ckpt_dir).__name__}")
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    _check_float_dtype(dtype)
    params_path = ckpt_dir / "params.json"
    params = _read_params(params_path)
    for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
        if value is not None:
            if isinstance(value, bool) or not hasattr(value, "__index__") or value.__index__() < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            params[name] = value.__index__()
    return ckpt_dir, params_path, params


def _check_float_dtype(dtype) -> None:
    """ValueError unless dtype (a loader's or saver's cast) is None or a floating torch.dtype."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating torch.dtype such as torch.bfloat16, got {dtype!r}")


def check_weight_dtypes(state: dict, ckpt_dir: Path) -> None:
    """Every weight floating and all of one dtype (every matmul needs one): named here, not in the
    first forward. ValueError naming the keys otherwise."""
    by_dtype = {}
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{key}: a model weight must be a floating tensor, got {tensor.dtype} in {ckpt_dir}")
        by_dtype.setdefault(str(tensor.dtype).removeprefix("torch."), []).append(key)
    if len(by_dtype) > 1:
        mix = "; ".join(f"{dtype}: {len(keys)} keys ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                        for dtype, keys in sorted(by_dtype.items(), key=lambda item: len(item[1])))
        raise ValueError(f"{ckpt_dir}: the weights mix dtypes, {mix}; pass dtype= to load them in one")


def default_checkpoint() -> Path:
    """The embedded default model, `mtp_engine/default_model` (params, shard, tokenizer, logs): package
    data, so that an installed wheel has it as a checkout does."""
    path = Path(__file__).resolve().parent / "default_model"
    if not (path / "params.json").is_file():
        raise FileNotFoundError(f"the default model is not at {path} (this installation of mtp-engine lacks its "
                                "package data); pass --ckpt-dir")
    return path


def find_shards(ckpt_dir: PathLike) -> List[Path]:
    """The `consolidated.NN.pth` files of `ckpt_dir` in rank order; numbering must be 0..n-1."""
    ckpt_dir = Path(ckpt_dir)
    ranks = {}
    for p in ckpt_dir.iterdir():
        m = SHARD_PATTERN.match(p.name)
        if m:
            rank = int(m.group(1))
            if rank in ranks:
                first, second = sorted((ranks[rank].name, p.name))
                raise ValueError(f"{ckpt_dir} has two shards for rank {rank}: {first} and {second}")
            ranks[rank] = p
    if not ranks:
        raise FileNotFoundError(f"no consolidated.NN.pth shard in {ckpt_dir}")
    missing = [r for r in range(max(ranks) + 1) if r not in ranks]
    if missing:
        names = ", ".join(f"consolidated.{r:02d}.pth" for r in missing)
        raise FileNotFoundError(f"{ckpt_dir} has shards {sorted(ranks)} but is missing {names}")
    return [ranks[r] for r in sorted(ranks)]


def read_json_object(path: Path) -> dict:
    """A JSON object from `path` (params.json, a run's trainer_state.json or train_log.json); a missing,
    damaged or non-object file is an error that names it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} not found: {path}")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _read_params(path: Path) -> dict:
    params = read_json_object(path)
    # Meta writes these sizes in every params.json; a default in their place would blame the weights.
    missing = [k for k in _REQUIRED_PARAMS if k not in params]
    if missing:
        raise ValueError(f"{path} has no {', '.join(repr(k) for k in missing)}")
    return params


def params_vocab_size(params: dict, params_path: Path) -> Optional[int]:
    """params.json's vocab_size, or None where the weights must give it (Meta writes -1; absent,
    null or <= 0 alike). ValueError naming the file for a value that is not an int ("8192")."""
    value = params.get("vocab_size", -1)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{params_path}: vocab_size must be an int (-1: from the weights), got {value!r}")
    return value if value > 0 else None


def _load_shard(path: Path) -> Dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - torch raises several types for a corrupt or non-zip file
        try:   # torch's legacy (pre-zip) format cannot be memory-mapped, but reads whole
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read checkpoint shard {path}: {type(e).__name__}: {e}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} must hold a state dict (str -> tensor)")
    return {k: v for k, v in sd.items() if k not in IGNORED_KEYS}


def _check_consistent_keys(shards: List[dict], paths: List[Path]) -> None:
    first = set(shards[0])
    for sd, path in zip(shards[1:], paths[1:]):
        extra, lacking = sorted(set(sd) - first), sorted(first - set(sd))
        if extra or lacking:
            raise ValueError(f"shard key sets differ: {path.name} has keys {extra} that {paths[0].name} lacks "
                             f"and lacks keys {lacking} that {paths[0].name} has")


def _vocab_from_shards(shards: List[dict], params_path: Path) -> int:
    if "output.weight" in shards[0]:
        return sum(int(s["output.weight"].shape[0]) for s in shards)
    if "tok_embeddings.weight" in shards[0]:
        return int(shards[0]["tok_embeddings.weight"].shape[0])
    raise ValueError(f"{params_path}: vocab_size is not set and the checkpoint has neither output.weight "
                     "nor tok_embeddings.weight to take it from")


def _block_indices(keys, kind: str) -> List[int]:
    return sorted({int(m.group(2)) for k in keys if (m := _BLOCK_KEY.match(k)) and m.group(1) == kind})


def _check_head_count(args: ModelArgs, shard: dict, params_path: Path, shard_path: Path) -> None:
    """A clearer message than a list of missing keys when n_future_tokens does not fit the blocks."""
    n_layers_found = len(_block_indices(shard, "layers"))
    n_extra_found = len(_block_indices(shard, "extra_heads"))
    n_layers_want, n_extra_want = args.n_trunk_layers + 1, args.n_future_tokens - 1
    if (n_layers_found, n_extra_found) == (n_layers_want, n_extra_want):
        return
    # A block with fewer keys than the others (a stray key, a half-written block) is named as such.
    blocks = {}
    for key in shard:
        m = _BLOCK_KEY.match(key)
        if m:
            blocks.setdefault(f"{m.group(1)}.{m.group(2)}", set()).add(m.group(3))
    full = max(blocks.values(), key=len, default=set())
    partial = {name: sorted(f"{name}.{k}" for k in keys) for name, keys in blocks.items() if keys != full}
    if partial:
        name, keys = sorted(partial.items())[0]
        raise ValueError(f"{shard_path.name}: block {name} has {len(keys)} of a block's {len(full)} keys "
                         f"({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}): a stray or partly written "
                         f"block ({params_path.name}: n_layers={args.n_layers}, n_future_tokens={args.n_future_tokens})")
    if n_layers_found + n_extra_found == args.n_layers and n_extra_found != n_extra_want:
        raise ValueError(
            f"{params_path.name} says n_future_tokens={args.n_future_tokens} ({n_extra_want} extra heads) "
            f"but {shard_path.name} has {n_extra_found} extra_heads blocks (n_future_tokens={n_extra_found + 1} "
            f"would fit its {n_layers_found} layers + {n_extra_found} extra heads = {args.n_layers} blocks)")
    raise ValueError(
        f"{params_path.name} (n_layers={args.n_layers}, n_future_tokens={args.n_future_tokens}) expects "
        f"{n_layers_want} `layers` and {n_extra_want} `extra_heads` blocks, but {shard_path.name} has "
        f"{n_layers_found} and {n_extra_found}")


def _check_key_sets(expected: dict, shard: dict, paths: List[Path]) -> None:
    missing = sorted(set(expected) - set(shard))
    unexpected = sorted(set(shard) - set(expected))
    where = paths[0].name if len(paths) == 1 else f"{paths[0].name} (and every other shard)"
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if problems:
        raise ValueError(f"{where} does not match params.json: " + "; ".join(problems))


def _missing_shard_hint(key: str, got: tuple, want: tuple, n_shards: int) -> str:
    """For a merged weight whose split dim is a whole fraction of params.json's: the likely cause."""
    dim = shard_dim(key)
    if dim is None or len(got) != len(want) or not 0 < got[dim] < want[dim] or want[dim] % got[dim]:
        return ""
    return (f": its dim {dim} is 1/{want[dim] // got[dim]} of the expected size; is a consolidated.NN.pth shard "
            f"missing? ({n_shards} found)")


def _merge(key: str, parts: List[torch.Tensor], paths: List[Path], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]  # stays memory-mapped until moved or cast
    for part, path in zip(parts[1:], paths[1:]):
        if part.dtype != parts[0].dtype:   # torch.cat would promote the merged weight without a word
            if dtype is None or not all(p.is_floating_point() for p in parts):
                raise ValueError(f"{key} is {str(part.dtype).removeprefix('torch.')} in {path.name} but "
                                 f"{str(parts[0].dtype).removeprefix('torch.')} in {paths[0].name}; pass dtype= "
                                 "to load the shards in one")
            parts = [p.to(dtype) for p in parts]
            break
    dim = shard_dim(key)
    if dim is None:
        for part, path in zip(parts[1:], paths[1:]):
            if part.shape != parts[0].shape or not torch.equal(part, parts[0]):
                raise ValueError(f"{key} is replicated across shards but {path.name} differs from {paths[0].name}")
        return parts[0]
    shapes = [tuple(p.shape) for p in parts]
    if any(p.dim() != parts[0].dim() for p in parts) or parts[0].dim() <= dim or any(
            s[:dim] + s[dim + 1:] != shapes[0][:dim] + shapes[0][dim + 1:] for s in shapes):
        raise ValueError(f"{key}: shard shapes {shapes} cannot be concatenated on dim {dim}")
    return torch.cat(parts, dim=dim)


# ------------------------------------------------------------------------------------ saving
# Files that describe the model in a folder: a new model written there would leave them behind.
MODEL_FILES = ("params.json", "trainer_state.json", "optimizer.pt", "tree.json", "train_log.json", "distill_log.json")


def refuse_overwrite(out_dir: PathLike, command: str, hint: str) -> None:
    """ValueError when out_dir already holds a model (a checkpoint, a training run's state, a fitted
    tree.json): `command` writes a new one and would replace it without a word, or leave companions
    that describe the old one (tree rates, a resume/ copy, a run's state). hint: the way out."""
    out = Path(out_dir)
    if not out.is_dir():
        return
    found = sorted(p.name for p in out.iterdir() if p.name in MODEL_FILES or SHARD_PATTERN.match(p.name))
    if found:
        raise ValueError(f"{out} already holds a model ({', '.join(found[:5])}{', ...' if len(found) > 5 else ''}): "
                         f"{command} would write over it; {hint}, or give another output folder")


def check_save_target(ckpt_dir: PathLike, shards: int = 1) -> None:
    """What `save_checkpoint(..., shards=shards)` would refuse, checked before the work that produces
    the weights: a path that is a file (or under one), or shards of a checkpoint with more of them."""
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ValueError(f"shards must be a positive int, got {shards!r}")
    ckpt_dir = Path(ckpt_dir)
    for folder in (ckpt_dir, *ckpt_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"cannot save a checkpoint in {ckpt_dir}: {folder} is a file")
            break
    if ckpt_dir.is_dir():
        stale = [p.name for p in ckpt_dir.iterdir()
                 if (m := SHARD_PATTERN.match(p.name)) and int(m.group(1)) >= shards]
        if stale:
            raise ValueError(f"{ckpt_dir} already holds {sorted(stale)} from a checkpoint with more shards; "
                             "save into an empty directory")


def save_checkpoint(model: Transformer, ckpt_dir: PathLike, shards: int = 1, *,
                    state_dict: Optional[Dict[str, torch.Tensor]] = None,
                    dtype: Optional[torch.dtype] = None) -> List[Path]:
    """Write `params.json` and `consolidated.00.pth`..`{shards-1}` in Meta's layout.

    Returns the shard paths. Every split dim must be divisible by `shards`. Tensors are saved as
    contiguous CPU copies so a view never drags its whole storage into the file.
    state_dict: save this instead of model.state_dict() (e.g. gathered from FSDP shards; `model`
    then only supplies params). dtype: cast floating tensors (e.g. torch.bfloat16 for a release).
    Every file replaces its old one only once all are written (`replace_together`).
    """
    files = checkpoint_files(model, ckpt_dir, shards, state_dict=state_dict, dtype=dtype)
    replace_together(files)
    return [path for path, _ in files[1:]]


def _check_state_matches(state_dict, model: Transformer) -> None:
    """ValueError unless state_dict has the model's keys, as floating tensors of its shapes: what
    `load_checkpoint` would refuse is not written (over a good checkpoint, perhaps)."""
    if not isinstance(state_dict, dict):
        raise ValueError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing:
        problems.append(f"missing keys {missing[:5]}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}")
    for key in sorted(set(expected) & set(state_dict)):
        value = state_dict[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            problems.append(f"{key} is {getattr(value, 'dtype', type(value).__name__)}, not a floating tensor")
        elif tuple(value.shape) != expected[key]:
            problems.append(f"{key} {tuple(value.shape)} != {expected[key]}")
    if problems:
        raise ValueError(f"state_dict does not match the model it is saved with: {'; '.join(problems[:6])}")


def checkpoint_files(model: Transformer, ckpt_dir: PathLike, shards: int = 1, *,
                     state_dict: Optional[Dict[str, torch.Tensor]] = None,
                     dtype: Optional[torch.dtype] = None) -> list:
    """`save_checkpoint`'s files as [(path, write)] for `replace_together`, params.json first, after
    its checks (which raise before anything is written); ckpt_dir is created. A caller that writes
    other files with a checkpoint (a trainer's state) passes them to the same `replace_together`."""
    check_save_target(ckpt_dir, shards)
    if not isinstance(model, Transformer):
        raise ValueError(f"save_checkpoint needs a Transformer, got {type(model).__name__}")
    _check_float_dtype(dtype)
    state = model.state_dict() if state_dict is None else state_dict
    if state_dict is not None:
        _check_state_matches(state_dict, model)
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    # Meta's model-parallel code gives each rank n_heads / shards query heads and n_kv_heads / shards
    # KV heads: a split inside a head loads here but not in the release, so it is not written.
    for name, count in (("n_heads", model.params.n_heads), ("n_kv_heads", model.params.n_kv_heads or model.params.n_heads)):
        if count % shards:
            raise ValueError(f"cannot save {shards} shards of a model with {name}={count}: Meta's layout gives every "
                             f"shard whole attention heads ({name} must be divisible by the shard count)")
    for key, tensor in state.items():
        dim = shard_dim(key)
        if dim is not None and tensor.shape[dim] % shards:
            raise ValueError(f"cannot split {key} of shape {tuple(tensor.shape)} into {shards} shards: "
                             f"dim {dim} ({tensor.shape[dim]}) is not divisible by {shards}")

    params = {k: v for k, v in model.params.to_dict().items() if k in PARAMS_JSON_FIELDS}
    for optional in ("n_kv_heads", "ffn_dim_multiplier"):
        if params.get(optional) is None:
            params.pop(optional, None)
    def shard_writer(rank: int):
        def write(tmp: Path) -> None:
            part = {}
            for key, tensor in state.items():
                dim = shard_dim(key)
                if dim is not None and shards > 1:
                    tensor = tensor.chunk(shards, dim=dim)[rank]
                part[key] = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
            torch.save(part, tmp)
        return write

    paths = [ckpt_dir / f"consolidated.{rank:02d}.pth" for rank in range(shards)]
    return ([(ckpt_dir / "params.json", lambda tmp: tmp.write_text(json.dumps(params, indent=2) + "\n"))]
            + [(path, shard_writer(rank)) for rank, path in enumerate(paths)])


def replace_together(files) -> None:
    """files: [(path, write)]. Every file is written to a temporary one first (write(tmp_path)), and
    only when all are written are they renamed over their paths, in the order given, so a save that
    fails (a full disk, an interrupt) leaves the old checkpoint whole, never new params.json and
    shard 0 beside an old shard 1.

    A model loaded from this directory still memory-maps the old shards; rewriting a file in place
    would change its weights under it or kill it with SIGBUS once the file shrinks. A rename leaves
    the old inode alive for as long as it is mapped."""
    written = []
    try:
        for path, write in files:
            tmp = path.with_name(path.name + ".tmp")
            written.append((tmp, path))
            write(tmp)
        for tmp, path in written:
            os.replace(tmp, path)
    finally:
        for tmp, _ in written:
            if tmp.exists():
                tmp.unlink()

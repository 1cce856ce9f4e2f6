"""`mtp eval`: how good are a checkpoint's heads, and how far would they carry self-speculative decoding?

Two measurements on held-out files (the `test/` folders of the source tree by default):
  1. per-head cross-entropy and top-1 accuracy on packed held-out windows;
  2. greedy self-speculative tokens per forward on held-out prompts.

Greedy output does not depend on drafting, so (2) needs no speculative generator: one greedy
rollout per prompt, then one forward over prompt + rollout gives every head's top-k at every
position, ranked by the generator's own drafting function (`draft_ranks`), and the accepted length
of each step follows (`chain_tokens_per_forward`, `tree_tokens_per_forward`). The step structure is
the generator's: the prefill forward yields one token; each later forward verifies drafts made at
the last accepted position and yields the accepted drafts plus one verified token. (Tested equal to
the generator's count in float32; in bf16 the uncached forward here and the generator's cached ones
round differently, so a near-tie can cost or save a forward.)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from .checkpoint import default_checkpoint
from .data import CorpusSource, _unit_hash, check_extensions, read_text

CHAIN = "chain"


def chain_tokens_per_forward(top1: torch.Tensor, sequence: Sequence[int], prompt_len: int, gen_len: int) -> dict:
    """Tokens per forward of greedy chain drafting along a fixed greedy rollout.

    top1: (L, k) int, top1[t, i] = head i's argmax at position t of `sequence` (head i predicts t+1+i).
    sequence: prompt + rollout (length >= prompt_len + gen_len). Returns {'tokens_per_forward',
    'forwards', 'accepted_per_depth'}.
    """
    k = top1.shape[1]
    paths = {tuple([0] * d) for d in range(1, k)}
    ranks = [[0 if t + 1 + i < len(sequence) and int(top1[t, i]) == int(sequence[t + 1 + i]) else -1
              for i in range(k)] for t in range(top1.shape[0])]
    return _walk(ranks, paths, prompt_len, gen_len, k, len(sequence))


def tree_tokens_per_forward(topk: torch.Tensor, sequence: Sequence[int], prompt_len: int, gen_len: int,
                            tree: Sequence[Sequence[int]]) -> dict:
    """As chain_tokens_per_forward for a static token tree in Medusa's path format.

    topk: (L, k, K) int, head i's top-K ids at each position (K > every rank used by `tree`).
    A node [r1, .., rd] holds head d's rank-rd candidate; a step accepts the deepest node whose
    every candidate along its path equals the rollout.
    """
    paths = {tuple(p) for p in tree}
    k = topk.shape[1]
    ranks = []
    for t in range(topk.shape[0]):
        row = [-1] * k
        for i in range(1, k):
            if t + 1 + i < len(sequence):
                hits = (topk[t, i] == int(sequence[t + 1 + i])).nonzero()
                row[i] = int(hits[0, 0]) if hits.numel() else -1
        ranks.append(row)
    return _walk(ranks, paths, prompt_len, gen_len, k, len(sequence))


def _walk(ranks: List[List[int]], paths: set, prompt_len: int, gen_len: int, k: int, length: int) -> dict:
    produced, forwards = 1, 1           # the prefill forward yields the first token
    q = prompt_len - 1                  # position whose heads drafted the current step
    accepted_per_depth = [0] * k
    steps = 0
    while produced < gen_len:
        path: tuple = ()
        for depth in range(1, k):
            r = ranks[q][depth] if q < len(ranks) else -1
            if r < 0 or path + (r,) not in paths:
                break
            path += (r,)
            accepted_per_depth[depth] += 1
        produced += len(path) + 1
        forwards += 1
        steps += 1
        q += len(path) + 1
    return {"tokens_per_forward": gen_len / forwards, "forwards": forwards, "steps": steps,
            "accepted_per_depth": accepted_per_depth[1:]}


def heldout_token_stream(tokenizer, source: Union[None, Path, CorpusSource] = None, max_files: int = 40,
                         split: str = "heldout") -> List[List[int]]:
    """Token ids (bos + text + eos) of up to `max_files` files of the held-out (or "train") split of
    `source` (a folder, None for the stdlib, or a CorpusSource with its endings and share), chosen by
    a fixed hash order."""
    found = CorpusSource.of(source).split()
    source = found.root
    files = sorted(found.heldout if split == "heldout" else found.train,
                   key=lambda f: _unit_hash("eval:" + f.relative_to(source).as_posix()))
    streams = []
    for f in files:
        text = read_text(f)
        if text and len(text) > 200:
            streams.append(tokenizer.encode(text, bos=True, eos=True))
        if len(streams) >= max_files:
            break
    if not streams:
        raise ValueError(f"no readable {'held-out' if split == 'heldout' else 'training'} files of more than "
                         f"200 characters under {source}")
    return streams


def sample_prompts(streams: List[List[int]], n_prompts: int, prompt_len: int, gen_len: int) -> List[List[int]]:
    """One prompt per file at a fixed place inside it (a file's start is license text and imports)."""
    prompts = []
    for s in streams:
        if len(s) >= prompt_len + gen_len + 2:
            start = int(_unit_hash(f"prompt:{len(prompts)}:{len(s)}") * (len(s) - prompt_len - gen_len))
            prompts.append(s[start:start + prompt_len])
        if len(prompts) >= n_prompts:
            break
    if not prompts:
        raise ValueError(f"no file has the {prompt_len + gen_len + 2} tokens a prompt and its continuation need")
    return prompts


def _check_counts(**values) -> None:
    """ValueError naming the first value that is not an int >= 1 (0 prompts or files used to run
    with 1, silently; 0 new tokens printed a tokens-per-forward of 0)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def build_tree_for_model(model, tokenizer, budget: int, source: Union[None, Path, CorpusSource] = None,
                         n_prompts: int = 16, prompt_len: int = 64, gen_len: int = 64, top_k: int = 8) -> dict:
    """A token tree fitted to `model`: per-head top-k acceptance rates measured on greedy rollouts of
    prompts from TRAINING files (so held-out evaluation stays untouched), then `build_tree`."""
    from .speculative import build_tree, expected_accept_length, measure_acceptance_rates

    _check_counts(budget=budget, n_prompts=n_prompts, prompt_len=prompt_len, gen_len=gen_len, top_k=top_k)
    prompts = sample_prompts(heldout_token_stream(tokenizer, source, 4 * n_prompts, split="train"),
                             n_prompts, prompt_len, gen_len)
    rates = measure_acceptance_rates(model, prompts, top_k=top_k, max_gen_len=gen_len)
    paths = build_tree(rates, budget)
    return {"paths": paths, "rates": rates, "expected_accept_length": expected_accept_length(paths, rates),
            "prompts": len(prompts), "budget": budget}


def evaluate_checkpoint(model, tokenizer, *, source: Union[None, Path, CorpusSource] = None, max_files: int = 40,
                        seq_len: Optional[int] = None, n_prompts: int = 16, prompt_len: int = 64,
                        gen_len: int = 64, trees: Optional[dict] = None, batch_size: int = 8) -> dict:
    """Both measurements; returns a dict ready for JSON (see `format_table`)."""
    from .generate import Generator
    from .train import evaluate

    _check_counts(max_files=max_files, n_prompts=n_prompts, prompt_len=prompt_len, gen_len=gen_len,
                  batch_size=batch_size, **({} if seq_len is None else {"seq_len": seq_len}))
    if trees and CHAIN in trees:
        raise ValueError(f"a tree may not be named {CHAIN!r}: that is the chain row's name (see add_tree)")
    n = model.n_future_tokens
    trees = trees or {}
    K = check_speculative_measurement(model, trees, prompt_len, gen_len)
    # The rollout runs n - 1 tokens past gen_len: the last verify step's drafts reach past it, and
    # the generator counts their acceptance (SpeculativeCounters), so the walks check them too.
    rollout_len = gen_len + n - 1
    source = CorpusSource.of(source)
    streams = heldout_token_stream(tokenizer, source, max_files)
    seq_len = seq_len or model.params.max_seq_len
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in streams])
    n_windows = len(flat) // seq_len
    if n_windows == 0:
        raise ValueError(f"held-out text has {len(flat)} tokens, fewer than one window of {seq_len}")
    windows = torch.from_numpy(flat[: n_windows * seq_len].reshape(n_windows, seq_len))
    head_eval = evaluate(model, windows, batch_size=batch_size)

    prompts = sample_prompts(streams, n_prompts, prompt_len, gen_len)
    gen = Generator(model, tokenizer=None, max_batch_size=len(prompts), max_seq_len=prompt_len + rollout_len + 1)
    rollout = gen.generate(prompts, max_gen_len=rollout_len, temperature=0.0, eos_id=-1)
    model.clear_caches()   # the forwards below are uncached, from position 0
    results = {CHAIN: []} | {name: [] for name in trees}
    with torch.no_grad():
        for prompt, out in zip(prompts, rollout.tokens):
            sequence = prompt + out
            topk = draft_ranks(model, sequence, K)                                                     # (L, n, K)
            results[CHAIN].append(chain_tokens_per_forward(topk[..., 0], sequence, len(prompt), gen_len))
            for name, tree in trees.items():
                results[name].append(tree_tokens_per_forward(topk, sequence, len(prompt), gen_len, tree))
    speculative = {}
    for name, runs in results.items():
        forwards = sum(r["forwards"] for r in runs)
        produced = sum(r["tokens_per_forward"] * r["forwards"] for r in runs)
        steps = sum(r["steps"] for r in runs)
        depth_hits = np.sum([r["accepted_per_depth"] for r in runs], axis=0).tolist()
        speculative[name] = {"tokens_per_forward": produced / forwards, "prompts": len(runs),
                             "acceptance_per_depth": [h / steps for h in depth_hits] if steps else []}
    return {"heads": n, "heldout_windows": n_windows, "seq_len": seq_len, "head_loss": head_eval["loss"],
            "head_top1": head_eval["acc"], "prompt_len": prompt_len, "gen_len": gen_len, "prompts_asked": n_prompts,
            "speculative": speculative, "trees": {k: [list(p) for p in v] for k, v in trees.items()},
            "corpus": {"folder": str(source.root), "extensions": list(source.extensions),
                       "heldout_fraction": source.heldout_fraction}}


def check_speculative_measurement(model, trees: dict, prompt_len: int, gen_len: int) -> int:
    """Before any work: every tree rank within the vocabulary and prompt + rollout within the rotary
    table (ValueError naming the tree or the lengths). Returns K, the ranks the trees use."""
    K = 1 + max([max(p) for tree in trees.values() for p in tree] or [0])
    if K > model.vocab_size:
        name = next(name for name, tree in trees.items() if any(max(p) >= model.vocab_size for p in tree))
        raise ValueError(f"tree {name!r} has a node of rank {K - 1}, but a head has only {model.vocab_size} tokens "
                         "to rank")
    past = model.n_future_tokens - 1
    model.check_uncached_length(prompt_len + gen_len + past,
                                f"--prompt-len {prompt_len} + --gen-len {gen_len} (+ {past} drafted past it)")
    return K


def draft_ranks(model, sequence: Sequence[int], K: int) -> torch.Tensor:
    """(L, n, K) int64 on the CPU: at every position of `sequence` each drafting head's top K tokens,
    ranked as the generator drafts them (`speculative.draft_tokens`: its scores, its tie order), from
    one uncached forward; head 0's column is -1 (it verifies, never drafts)."""
    from .speculative import draft_tokens

    hidden = model.head_hidden(torch.tensor([sequence], device=model.output.weight.device))[:, 0]   # (n, L, D)
    drafts = draft_tokens(hidden[1:].transpose(0, 1).contiguous(), model.output.weight, K).cpu()    # (L, n-1, K)
    return torch.cat([torch.full((drafts.shape[0], 1, K), -1, dtype=torch.int64), drafts], dim=1)


def format_table(result: dict) -> str:
    where = f" (held-out files of {result['corpus']['folder']})" if "corpus" in result else ""
    lines = [f"Held-out loss and top-1 accuracy over {result['heldout_windows']} windows of {result['seq_len']} "
             f"tokens{where}:",
             "", "| head | predicts | held-out loss | top-1 accuracy |", "|---|---|---|---|"]
    for i, (loss, acc) in enumerate(zip(result["head_loss"], result["head_top1"])):
        lines.append(f"| {i} | token t+{i + 1} | {loss:.3f} | {acc:.3f} |")
    used, asked = result["speculative"][CHAIN]["prompts"], result.get("prompts_asked")
    fewer = f" (of {asked} asked: one per held-out file long enough, see --max-files)" if asked and used < asked else ""
    lines += ["", f"Greedy self-speculative decoding, {used} held-out prompts{fewer} of "
              f"{result['prompt_len']} tokens, {result['gen_len']} new tokens each:", "",
              "| drafting | tokens per forward | acceptance by depth |", "|---|---|---|"]
    for name, r in result["speculative"].items():
        label = name if name == CHAIN else f"tree `{name}` ({len(result['trees'][name])} nodes)"
        depth = len(r["acceptance_per_depth"]) if name == CHAIN else max(map(len, result["trees"][name]))
        # a depth the tree has no node at is "-", not an acceptance of 0
        acc = " / ".join(f"{a:.2f}" if d < depth else "-" for d, a in enumerate(r["acceptance_per_depth"]))
        lines.append(f"| {label} | {r['tokens_per_forward']:.2f} | {acc} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt-dir", default=None, help="checkpoint (default: the embedded mtp_engine/default_model)")
    parser.add_argument("--tokenizer-path", default=None, help="default: tokenizer.model in --ckpt-dir or its parent")
    add_source_arguments(parser, "held-out")
    parser.add_argument("--max-files", type=int, default=40, help="held-out files to read (default 40)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per held-out loss window (default: the context the checkpoint was trained "
                             "on, from its train_log.json; else the model's max_seq_len)")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts for tokens/forward (default 16)")
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per held-out prompt (default 64)")
    parser.add_argument("--gen-len", type=int, default=64, help="greedy new tokens per prompt (default 64)")
    parser.add_argument("--tree", action="append", default=None,
                        help="tree preset name or JSON list of paths; repeatable (default: the preset for the "
                             "model's head count)")
    parser.add_argument("--build-tree", default=None, metavar="JSON",
                        help="first fit a tree to this model (acceptance rates on training-split prompts) and "
                             "write it here; it is then evaluated beside the others")
    parser.add_argument("--tree-budget", type=int, default=47, help="drafted nodes of --build-tree (default 47)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--json", default=None, help="also write the result here")


def resolve_trees(specs: Optional[List[str]], heads: int) -> dict:
    from . import speculative

    if not specs:
        name = speculative.default_tree_name(heads)
        return {name: speculative.resolve_tree(name, heads)}
    trees = {}
    for spec in specs:
        paths = speculative.tree_argument(spec)
        name = Path(spec).stem if spec.endswith(".json") else spec if isinstance(paths, str) else f"custom{len(trees)}"
        add_tree(trees, name, speculative.resolve_tree(paths, heads))
    return trees


def training_log(ckpt_dir: Path) -> Path:
    """Where a checkpoint's train_log.json is (`mtp train` writes it, `mtp distill` carries it over):
    in its folder, or for a training run's resume/ copy (its float32 master weights) in the run's
    folder above. The path may not exist."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "train_log.json").is_file() and ckpt_dir.name == "resume" \
            and (ckpt_dir.parent / "trainer_state.json").is_file():
        return ckpt_dir.parent / "train_log.json"
    return ckpt_dir / "train_log.json"


def trained_config(ckpt_dir: Path) -> dict:
    """The training configuration of a checkpoint (its `training_log`'s "config"), or {} without one."""
    try:
        config = json.loads(training_log(ckpt_dir).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return config if isinstance(config, dict) else {}


def trained_seq_len(ckpt_dir: Path) -> Optional[int]:
    """The window a checkpoint was trained on (its `trained_config`), or None."""
    value = trained_config(ckpt_dir).get("seq_len")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _run_source(config: dict) -> CorpusSource:
    """The corpus settings of a training configuration (a log older than a setting: its default)."""
    return CorpusSource(config.get("source"), tuple(config.get("extensions") or CorpusSource.extensions),
                        config.get("heldout_fraction", CorpusSource.heldout_fraction))


def run_manifest(ckpt_dir: Path) -> Optional[dict]:
    """The corpus manifest (data.prepare_corpus) of the run that trained a checkpoint: manifest.json in
    its config's corpus_dir, if that cache is still the run's (its folder, endings and share; another
    run may have rebuilt a shared cache). None otherwise."""
    config = trained_config(ckpt_dir)
    run = _run_source(config)
    try:
        manifest = json.loads((Path(config["corpus_dir"]) / "manifest.json").read_text())
        same = (Path(manifest["source"]).resolve() == run.root.resolve()
                and sorted(manifest["extensions"]) == sorted(run.extensions)
                and manifest["heldout_fraction"] == run.heldout_fraction
                and all(isinstance(manifest[k], list) for k in ("train_files", "heldout_files")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if same else None


def trained_source(ckpt_dir: Path, folder=None, extensions=None, heldout_fraction=None) -> CorpusSource:
    """The corpus a checkpoint was trained on (its `trained_config`: folder, file endings, held-out
    share), with what is given (not None) in place of the run's. Without endings or share given, and
    with the run's corpus manifest at hand (`run_manifest`), the run's own file lists are used, in the
    given folder too (a corpus moved elsewhere) where all its held-out files are there: a file added
    since, or a training file removed, cannot move a training file into the held-out set (with a
    held-out file gone the folder is split anew, and `split_against_run` names what crossed). A
    checkpoint without a training log, or an older log, gets the stdlib and the default endings and
    share."""
    run = _run_source(trained_config(ckpt_dir))
    if folder is None and run.folder is not None and not Path(run.folder).is_dir():
        raise ValueError(f"{ckpt_dir} was trained on the files under {run.folder}, which is not here: give --source")
    manifest = run_manifest(ckpt_dir) if extensions is None and heldout_fraction is None else None
    source = CorpusSource(run.folder if folder is None else str(folder),
                          check_extensions(extensions or run.extensions),
                          run.heldout_fraction if heldout_fraction is None else heldout_fraction)
    if manifest is not None and all((source.root / f).is_file() for f in manifest["heldout_files"]):
        source = dataclasses.replace(source, train_files=tuple(manifest["train_files"]),
                                     heldout_files=tuple(manifest["heldout_files"]))
    return source


def split_against_run(source: CorpusSource, ckpt_dir: Path, side: str) -> Optional[str]:
    """What to warn of when `source` is split anew (not the run's own lists) and its `side` ("heldout"
    or "train") holds files the run used the other way (its corpus manifest, by relative name); None
    when there is nothing to say."""
    manifest = run_manifest(ckpt_dir)
    if manifest is None or source.heldout_files is not None:
        return None
    found = source.split()
    files = found.heldout if side == "heldout" else found.train
    other = set(manifest["train_files"] if side == "heldout" else manifest["heldout_files"])
    crossed = [f for f in files if f.relative_to(found.root).as_posix() in other]
    what = "held-out" if side == "heldout" else "training"
    if crossed:
        return (f"{len(crossed)} of the {len(files)} {what} files of this split were "
                f"{'training' if side == 'heldout' else 'held-out'} files of the run (its corpus manifest), "
                f"e.g. {crossed[0].relative_to(found.root).as_posix()}")
    return None


def add_source_arguments(parser: argparse.ArgumentParser, split: str) -> None:
    """--source, --extension and --heldout-fraction: which corpus's `split` files a command reads
    (default: the one the checkpoint was trained on, see `trained_source`)."""
    parser.add_argument("--source", default=None,
                        help=f"corpus folder whose {split} files are read (default: the checkpoint's training "
                             "corpus, from its train_log.json; else the stdlib)")
    parser.add_argument("--extension", dest="extensions", action="append", default=None,
                        help="file ending read from --source, repeatable (default: the training run's, else .py)")
    parser.add_argument("--heldout-fraction", type=float, default=None,
                        help="held-out share of a folder without test/ folders (default: the training run's, "
                             "else 0.05)")


def past_trained_context(ckpt_dir, prompt_len: int, gen_len: int) -> Optional[str]:
    """What to warn of when prompts of prompt_len + gen_len new tokens run past the window the
    checkpoint was trained on (trained_seq_len), or None."""
    trained = trained_seq_len(ckpt_dir)
    if trained is None or prompt_len + gen_len <= trained:
        return None
    return (f"prompts of {prompt_len} + {gen_len} new tokens run past the {trained}-token context the model "
            "was trained on (its train_log.json)")


def add_tree(trees: dict, name: str, paths) -> str:
    """trees[name] = paths under a name no other tree and not the chain row has ("name#2", ...): two
    trees under one name, or a tree called "chain", would pool their results in one row."""
    unique, k = name, 1
    while unique in trees or unique == CHAIN:
        k += 1
        unique = f"{name}#{k}"
    trees[unique] = paths
    return unique


def run(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .checkpoint import resolve_device
    from .tokenizer import Tokenizer, find_tokenizer

    # Before minutes of evaluation, not after: the sizes, and where the results go.
    _check_counts(max_files=args.max_files, prompts=args.prompts, prompt_len=args.prompt_len, gen_len=args.gen_len,
                  tree_budget=args.tree_budget, **({} if args.seq_len is None else {"seq_len": args.seq_len}))
    for option, path in (("--json", args.json), ("--build-tree", args.build_tree)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise ValueError(f"{option} {path}: its folder does not exist")
        if path is not None and Path(path).is_dir():
            raise ValueError(f"{option} {path} is a folder; it must name the file to write")
    ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else default_checkpoint()
    source = trained_source(ckpt_dir, args.source, args.extensions, args.heldout_fraction)
    crossed = split_against_run(source, ckpt_dir, "heldout")
    if crossed:
        print(f"eval: warning: {crossed}: the held-out figures below include text the model was trained on")
    tokenizer = Tokenizer(find_tokenizer(ckpt_dir, args.tokenizer_path))
    device = resolve_device(args.device)
    model = load_checkpoint(ckpt_dir, device=device, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
    tokenizer.check_vocab(model.vocab_size)
    model.eval()
    if model.n_future_tokens < 2 and args.tree:
        raise ValueError("--tree needs a model with at least 2 heads (this one has only head 0: nothing drafts)")
    trees = resolve_trees(args.tree, model.n_future_tokens) if model.n_future_tokens > 1 else {}
    check_speculative_measurement(model, trees, args.prompt_len, args.gen_len)   # before minutes of work
    if args.build_tree:
        if model.n_future_tokens < 2:
            raise ValueError("--build-tree needs a model with at least 2 heads")
        fitted = build_tree_for_model(model, tokenizer, args.tree_budget, source=source, n_prompts=args.prompts,
                                      prompt_len=args.prompt_len, gen_len=args.gen_len)
        Path(args.build_tree).write_text(json.dumps(fitted, indent=1) + "\n")
        add_tree(trees, Path(args.build_tree).stem, fitted["paths"])
        print(f"fitted tree: {len(fitted['paths'])} nodes, expected accepted length "
              f"{fitted['expected_accept_length']:.2f} on {fitted['prompts']} training prompts -> {args.build_tree}")
    # Loss windows longer than the trained context would measure positions the model never learned.
    seq_len = args.seq_len or trained_seq_len(ckpt_dir)
    warning = past_trained_context(ckpt_dir, args.prompt_len, args.gen_len)
    if warning:
        print(f"eval: warning: {warning}: the speculative figures measure positions it never learned")
    result = evaluate_checkpoint(model, tokenizer, source=source, max_files=args.max_files, seq_len=seq_len,
                                 n_prompts=args.prompts, prompt_len=args.prompt_len, gen_len=args.gen_len, trees=trees)
    result["checkpoint"] = str(ckpt_dir)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0

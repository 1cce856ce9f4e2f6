"""`mtp demo`: the trained default model completes Python code, plainly and self-speculatively, on CPU.

Loads the embedded default model (`mtp_engine/default_model`: a 4-head MTP model trained on the Python
standard library), completes a prompt greedily with plain decoding and with tree self-speculative
decoding, checks that both give the same text, and prints how many tokens each forward produced.

`mtp demo --random-weights` instead runs the whole pipeline from nothing with a tiny random model
(tokenizer training, Meta-format save, `Llama.build` load, generation): it works without the
default model, and its text is noise.
"""
from __future__ import annotations

import sysconfig
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch

DEMO_PROMPT = "def fibonacci(n):\n    "
DEMO_VOCAB = 512
# Small, stable modules present in every CPython; any other .py files serve if these are gone.
STDLIB_SOURCES = ("textwrap.py", "heapq.py", "string.py", "bisect.py", "functools.py")


def stdlib_sources(count: int = 4) -> List[Path]:
    """A few standard-library .py files to train the demo tokenizer on."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = [root / name for name in STDLIB_SOURCES if (root / name).is_file()]
    if len(found) < count:
        found += [p for p in sorted(root.glob("*.py")) if p not in found and p.stat().st_size > 4000]
    if not found:
        raise FileNotFoundError(f"no standard-library .py files under {root} to train the demo tokenizer on")
    return found[:count]


def demo_args(vocab_size: int):
    from .model import ModelArgs

    return ModelArgs(dim=64, n_layers=6, n_heads=4, n_kv_heads=2, n_future_tokens=4, vocab_size=vocab_size,
                     multiple_of=32, max_seq_len=256, max_batch_size=1)


def run_trained_demo(ckpt_dir: Optional[str] = None, max_gen_len: int = 48, prompt: str = DEMO_PROMPT,
                     tokenizer_path: Optional[str] = None) -> str:
    """Greedy completion of `prompt` by the default model, plain and tree-speculative; returns the text."""
    from .checkpoint import default_checkpoint, load_checkpoint
    from .generate import Generator
    from .llama import read_tree_rates
    from .tokenizer import Tokenizer, find_tokenizer

    start = time.perf_counter()
    ckpt = Path(ckpt_dir) if ckpt_dir else default_checkpoint()
    tokenizer = Tokenizer(find_tokenizer(ckpt, tokenizer_path))
    model = load_checkpoint(ckpt, device="cpu", dtype=torch.float32).eval()
    tokenizer.check_vocab(model.vocab_size)
    p = model.params
    trained = ""
    log_path = ckpt / "train_log.json"
    if log_path.is_file():
        import json

        log = json.loads(log_path.read_text())
        trained = (f", trained on {log['summary']['tokens']:,} tokens of the Python standard library "
                   f"({log['device']})")
        if (ckpt / "distill_log.json").is_file():
            trained += ", drafting heads self-distilled (mtp distill)"
    print(f"model: {ckpt} — {model.num_params():,} parameters, {p.n_trunk_layers} trunk layers + "
          f"{p.n_future_tokens} heads, vocabulary {p.vocab_size}{trained}")
    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
    gen = Generator(model, tokenizer, max_batch_size=1, max_seq_len=len(prompt_ids) + max_gen_len + 64,
                    tree_rates=read_tree_rates(ckpt, model.n_future_tokens))
    plain = gen.generate([prompt_ids], max_gen_len=max_gen_len, temperature=0.0)
    print("\n--- greedy completion ---")
    print(prompt + plain.text[0])
    print("---")
    print(f"plain decoding:       {plain.stats['generated_tokens']} tokens, {plain.stats['forwards']} forwards, "
          f"{plain.stats['tokens_per_s']:.0f} tokens/s")
    if p.n_future_tokens > 1:
        spec = gen.generate([prompt_ids], max_gen_len=max_gen_len, temperature=0.0, speculative="tree")
        same = "identical text" if spec.tokens == plain.tokens else "DIFFERENT TEXT (a bug: please report)"
        depth = " / ".join("-" if a is None else f"{a:.2f}" for a in spec.stats.get("acceptance_per_depth", []))
        print(f"tree self-speculative: {spec.stats['generated_tokens']} tokens, {spec.stats['forwards']} forwards, "
              f"{spec.stats['tokens_per_forward']:.2f} tokens/forward, {spec.stats['tokens_per_s']:.0f} tokens/s; "
              f"acceptance by depth {depth}; {same}")
        if model.output.weight.device.type == "cpu":
            print("(on a CPU every tree node costs compute, so fewer forwards need not mean more tokens/s)")
    print(f"demo took {time.perf_counter() - start:.1f} s")
    return plain.text[0]


def run_demo(out: Optional[str] = None, max_gen_len: int = 24) -> str:
    """The random-weight pipeline demo, printing each stage; artifacts go to `out` (kept) or a temp dir
    (removed). Returns the generated text.
    """
    # A model this small is all tiny ops, where intra-op threads cost more than they give.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if out is None:
            with tempfile.TemporaryDirectory(prefix="mtp-demo-") as tmp:
                return _run(Path(tmp), max_gen_len)
        if Path(out).exists() and not Path(out).is_dir():
            raise ValueError(f"--out {out} is a file; it must be a folder (new or existing)")
        return _run(Path(out), max_gen_len)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, max_gen_len: int) -> str:
    from .checkpoint import save_checkpoint
    from .llama import Llama
    from .model import Transformer
    from .tokenizer import train_tokenizer

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    print("NOTE: random weights, the text is noise; this shows the pipeline end to end")

    sources = stdlib_sources()
    tokenizer = train_tokenizer(sources, DEMO_VOCAB, out / "tokenizer")
    print(f"1. tokenizer: SentencePiece BPE, {tokenizer.n_words} words, trained on "
          f"{', '.join(p.name for p in sources)} -> {out / 'tokenizer.model'}")

    torch.manual_seed(0)
    model = Transformer(demo_args(tokenizer.n_words))
    ckpt_dir = out / "ckpt"
    save_checkpoint(model, ckpt_dir)
    p = model.params
    print(f"2. model: {model.num_params():,} random parameters, {p.n_trunk_layers} trunk layers + "
          f"{p.n_future_tokens} prediction heads, dim {p.dim}; saved in Meta's layout -> {ckpt_dir}")
    del model

    llama = Llama.build(str(ckpt_dir), str(out / "tokenizer.model"), max_seq_len=128, max_batch_size=1,
                        device="cpu", dtype=torch.float32)
    print("3. loaded back with Llama.build on cpu, float32")

    [result] = llama.text_completion([DEMO_PROMPT], temperature=0.0, top_p=1.0, max_gen_len=max_gen_len)
    stats = llama.last_stats
    print("4. greedy completion:")
    print(DEMO_PROMPT + result["generation"])
    print(f"[stats] {stats['generated_tokens']} tokens, {stats['forwards']} forwards, "
          f"{stats['tokens_per_s']:.1f} tokens/s; demo took {time.perf_counter() - start:.1f} s")
    print("NOTE: random weights, the text is noise; this shows the pipeline end to end")
    return result["generation"]

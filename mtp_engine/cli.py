"""The `mtp` command line (also `python -m mtp_engine`).

User errors (missing files, bad arguments, prompts that do not fit) print one line and exit 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Optional

EXIT_USAGE = 2

EPILOG = """\
examples:
  mtp demo
  mtp complete --ckpt-dir 7B_1T_4 --tokenizer-path tokenizer.model \\
      --prompt "def fibonacci(n):" --max-gen-len 64
  mtp complete --ckpt-dir 7B_1T_4 --prompt "import numpy" --speculative tree --heads 4
"""


def build_parser() -> argparse.ArgumentParser:
    from .speculative import DEFAULT_TREE_TOKENS

    parser = argparse.ArgumentParser(
        prog="mtp", description="Multi-token-prediction language models on Triton kernels.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    complete = sub.add_parser(
        "complete", help="continue text prompts with a checkpoint in Meta's layout",
        description="Continue each --prompt with a model loaded from a Meta-layout checkpoint "
                    "(params.json + consolidated.NN.pth) and its SentencePiece tokenizer.",
        epilog='example:\n  mtp complete --ckpt-dir 7B_1T_4 --tokenizer-path tokenizer.model --prompt "import numpy"',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    complete.add_argument("--ckpt-dir", default=None,
                          help="checkpoint directory (params.json, consolidated.NN.pth); default: the embedded "
                               "mtp_engine/default_model")
    complete.add_argument("--tokenizer-path", default=None,
                          help="tokenizer.model (default: in --ckpt-dir or its parent, as Meta ships it)")
    complete.add_argument("--prompt", action="append", required=True,
                          help="text to continue; repeat for a batch")
    complete.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    complete.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (default 1)")
    complete.add_argument("--top-k", type=int, default=0,
                          help="sample from the k most likely tokens only, before the nucleus (default 0: no cut)")
    complete.add_argument("--min-p", type=float, default=0.0,
                          help="sample only tokens at least this fraction as likely as the most likely one, "
                               "before the nucleus (default 0: no cut)")
    complete.add_argument("--repetition-penalty", type=float, default=1.0,
                          help="divide a positive logit (multiply a negative one) of a token already in the prompt "
                               "or the completion by this, greedy too (default 1: none)")
    complete.add_argument("--presence-penalty", type=float, default=0.0,
                          help="subtract this from the logit of a token the completion holds (default 0: none)")
    complete.add_argument("--frequency-penalty", type=float, default=0.0,
                          help="subtract this from a token's logit per time the completion holds it (default 0: none)")
    complete.add_argument("--logit-bias", action="append", metavar="ID=BIAS", default=None,
                          help="add BIAS to token ID's logit, greedy too (-100 bans it in practice); repeat for "
                               "more tokens")
    complete.add_argument("--max-gen-len", type=int, default=64, help="most new tokens per prompt (default 64)")
    complete.add_argument("--max-seq-len", type=int, default=512, help="KV-cache length: prompt + new tokens (default 512)")
    complete.add_argument("--max-batch-size", type=int, default=None, help="KV-cache batch (default: number of prompts)")
    complete.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    complete.add_argument("--samples", type=int, default=1, metavar="N",
                          help="completions per prompt, each with its own sampling noise (needs --temperature > 0); "
                               "the prompt is computed once and shared (default 1)")
    complete.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    complete.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                          help="default: bfloat16 on cuda, float32 on cpu")
    complete.add_argument("--speculative", choices=("chain", "tree"), default=None,
                          help="self-speculative decoding with the model's extra heads: chain (top-1 per head) "
                               "or tree (a static token tree of top-k drafts); default: plain decoding")
    complete.add_argument("--heads", type=int, default=None,
                          help="heads taking part in --speculative, 2..n_future_tokens (default: all)")
    complete.add_argument("--tree", default=None, metavar="PRESET",
                          help="token tree for --speculative tree: a preset (chain, heads2 .. heads8), a tree file "
                               "(`mtp eval --build-tree`'s .json) or a JSON list "
                               "of paths such as '[[0], [1], [0, 0]]'; default: sized to the batch (at most "
                               + ", ".join(f"{n} tree tokens per forward on {d}" for d, n in DEFAULT_TREE_TOKENS.items())
                               + "), built from the checkpoint's tree.json rates when it has one")
    complete.add_argument("--stop", action="append", default=None, metavar="TEXT",
                          help="end a completion where its text reaches TEXT (repeatable; \\n, \\r and \\t in "
                               "TEXT are a newline, a carriage return and a tab), e.g. --stop '\\n\\n' --stop '\\ndef '")
    complete.add_argument("--stop-token-id", action="append", type=int, default=None, metavar="ID",
                          help="end a completion at token ID, as at eos (not printed); repeatable")
    complete.add_argument("--stream", action="store_true",
                          help="print the completion as it is generated (one --prompt); a speculative step "
                               "prints all the tokens it accepted at once")
    complete.set_defaults(run=run_complete)

    demo = sub.add_parser(
        "demo", help="the trained default model completes Python code, plain and self-speculative (CPU, seconds)",
        description="Complete a Python prompt with the embedded default model (mtp_engine/default_model), greedily with plain "
                    "and with tree self-speculative decoding, and print tokens per forward. --random-weights runs "
                    "the whole pipeline from scratch with a tiny random model instead.")
    demo.add_argument("--ckpt-dir", default=None, help="another checkpoint (default: mtp_engine/default_model)")
    demo.add_argument("--tokenizer-path", default=None,
                      help="tokenizer.model (default: in --ckpt-dir or its parent, as Meta ships it)")
    demo.add_argument("--prompt", default=None, help="text to continue (default: a Python function header)")
    demo.add_argument("--max-gen-len", type=int, default=None,
                      help="new tokens (default 48; 24 with --random-weights)")
    demo.add_argument("--random-weights", action="store_true",
                      help="tokenizer + random 4-head model + Meta-format save/load + generation, from nothing")
    demo.add_argument("--out", default=None, help="with --random-weights: keep its tokenizer and checkpoint here")
    demo.set_defaults(run=run_demo)

    from . import distill, evaluate, train

    # Commands whose module brings its own flags (`add_arguments`) and entry point (`run`).
    for module, name, kwargs in (
        (train, "train", dict(
            help="train an MTP model on a folder of source files (default: Python's standard library)",
            description="Train a tokenizer and an n-head MTP model on a folder of text/source files; checkpoints "
                        "in Meta's layout, resumable. Every TrainConfig field is a flag; --preset picks the "
                        "starting values.",
            epilog="examples:\n  mtp train --preset tiny --out-dir runs/tiny\n"
                   "  mtp train --preset default --out-dir runs/gpu --max-steps 3000\n"
                   "  torchrun --nproc_per_node 8 -m mtp_engine train --distributed fsdp --out-dir runs/big",
            formatter_class=argparse.RawDescriptionHelpFormatter)),
        (evaluate, "eval", dict(
            help="per-head held-out loss/accuracy and self-speculative tokens per forward, as a table",
            description="Evaluate a checkpoint on held-out files: per-head loss and top-1 accuracy, and greedy "
                        "self-speculative tokens per forward (chain and tree) on held-out prompts.")),
        (distill, "distill", dict(
            help="self-distill the drafting heads on the model's own greedy text (trunk and head 0 frozen)",
            description="Continue training-split prompts greedily with the model, then train only heads 1..n-1 "
                        "to predict those continuations: more accepted drafts, the same next-token model.")),
    ):
        command = sub.add_parser(name, **kwargs)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def run_complete(args: argparse.Namespace) -> int:
    from .checkpoint import default_checkpoint
    from .llama import Llama
    from .speculative import tree_argument
    from .tokenizer import find_tokenizer

    if args.ckpt_dir is None:
        args.ckpt_dir = str(default_checkpoint())
    if not os.path.isdir(args.ckpt_dir):
        raise FileNotFoundError(f"checkpoint directory not found: {args.ckpt_dir}")
    tokenizer_path = str(find_tokenizer(args.ckpt_dir, args.tokenizer_path))
    for name in ("max_gen_len", "max_seq_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.speculative is None and (args.heads is not None or args.tree is not None):
        raise ValueError("--heads and --tree need --speculative chain|tree")
    prompts = repeated_prompts(args.prompt, args.samples, args.temperature)
    if args.stream and len(prompts) != 1:
        asked = (f"one --prompt, not {len(args.prompt)}" if args.samples == 1 else
                 f"one --prompt and --samples 1, not {len(args.prompt)} prompt(s) x --samples {args.samples}")
        raise ValueError(f"--stream prints one completion as it is generated: give {asked}")
    tree = None if args.tree is None else tree_argument(args.tree)
    llama = Llama.build(args.ckpt_dir, tokenizer_path, max_seq_len=args.max_seq_len,
                        max_batch_size=len(prompts) if args.max_batch_size is None else args.max_batch_size,
                        device=args.device, dtype=args.dtype, seed=args.seed)
    stop = None if args.stop is None else [_unescape(text) for text in args.stop]
    on_tokens = _stream_printer(llama.tokenizer, args.prompt[0], stop or ()) if args.stream else None
    results = llama.text_completion(prompts, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                    min_p=args.min_p, max_gen_len=args.max_gen_len, speculative=args.speculative, heads=args.heads,
                                    tree=tree, on_tokens=on_tokens, stop=stop, repetition_penalty=args.repetition_penalty,
                                    presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                                    logit_bias=logit_bias_argument(args.logit_bias), stop_token_ids=args.stop_token_id)
    if args.stream:
        print("\n")
    else:
        print_completions(args.prompt, results, args.samples)
    print(format_stats(llama.last_stats))
    full = llama.last_stats["finish_counts"]["max_seq_len"]
    if full:   # asked for more than the cache holds: say why the text is short
        print(f"[note] {full} of {len(prompts)} sequence(s) stopped at --max-seq-len {args.max_seq_len} "
              f"(prompt + generated tokens) before --max-gen-len {args.max_gen_len}")
    return 0


def repeated_prompts(prompts: List[str], samples: int, temperature: float) -> List[str]:
    """--samples: each prompt `samples` times in a row (each copy draws its own noise: generate
    seeds every prompt of a call apart; Generator shares their prefill)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"--samples must be an int >= 1, got {samples!r}")
    if samples > 1 and not temperature > 0:
        raise ValueError(f"--samples {samples} needs --temperature > 0: greedy decoding gives {samples} "
                         "identical completions")
    return [prompt for prompt in prompts for _ in range(samples)]


def print_completions(prompts: List[str], results: List[dict], samples: int) -> None:
    """Each prompt, then its completions ('> text', or '> [k] text' for sample k of several)."""
    for i, prompt in enumerate(prompts):
        print(prompt)
        for k, result in enumerate(results[i * samples:(i + 1) * samples]):
            print(f"> [{k + 1}] {result['generation']}" if samples > 1 else f"> {result['generation']}")
        print()


def logit_bias_argument(pairs) -> dict | None:
    """--logit-bias's ID=BIAS pairs as generate's {id: bias} (the ids and values are checked there);
    ValueError naming a pair that is not an int, '=' and a number, or a token given twice."""
    if pairs is None:
        return None
    bias = {}
    for pair in pairs:
        token, _, value = pair.partition("=")
        try:
            token, value = int(token), float(value)
        except ValueError:
            raise ValueError(f"--logit-bias takes ID=BIAS (an int token id, a number), got {pair!r}") from None
        if token in bias:
            raise ValueError(f"--logit-bias gives token {token} twice")
        bias[token] = value
    return bias


def _unescape(text: str) -> str:
    """--stop's TEXT: backslash-n, -r and -t as a newline, a carriage return and a tab (a shell passes
    them as typed), a doubled backslash as one; everything else as it is."""
    return re.sub(r"\\([nrt\\])", lambda m: {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}[m.group(1)], text)


def _stream_printer(tokenizer, prompt: str, stop=()):
    """`mtp complete --stream`: generate's on_tokens, which prints the prompt at its first call (once
    generate has checked the inputs), then the completion's text as its tokens arrive
    (tokenizer.TextStream). With stop strings it holds back the last characters that could begin
    one, and prints nothing from a stop string on."""
    from .generate import first_stop
    from .tokenizer import TextStream

    text = TextStream(tokenizer)
    held = max(map(len, stop), default=1) - 1
    state = {"started": False, "printed": 0}   # characters of text.text printed

    def on_tokens(index, new_tokens, finish):
        if not state["started"]:   # the first call: the inputs passed generate's checks
            state["started"] = True
            print(prompt)
            print("> ", end="", flush=True)
        text.push(new_tokens)
        if finish:
            text.finish()
        if finish == "stop":   # generate found it: it begins past what was printed (held back)
            end = first_stop(text.text, stop, state["printed"])
        else:
            end = len(text.text) if finish else max(state["printed"], len(text.text) - held)
        print(text.text[state["printed"]:end], end="", flush=True)
        state["printed"] = max(state["printed"], end)
    return on_tokens


def run_demo(args: argparse.Namespace) -> int:
    from . import demo

    if args.max_gen_len is not None and args.max_gen_len < 1:
        raise ValueError(f"--max-gen-len must be >= 1, got {args.max_gen_len}")
    if args.random_weights:
        if args.prompt is not None or args.ckpt_dir is not None or args.tokenizer_path is not None:
            # its own model, tokenizer and prompt: not silently ignored
            raise ValueError("--prompt, --ckpt-dir and --tokenizer-path do not apply with --random-weights "
                             "(it builds its own model)")
        demo.run_demo(args.out, **({} if args.max_gen_len is None else {"max_gen_len": args.max_gen_len}))
    else:
        if args.out:
            raise ValueError("--out only applies with --random-weights")
        prompt = demo.DEMO_PROMPT if args.prompt is None else args.prompt   # "" is a prompt (bos alone)
        demo.run_trained_demo(args.ckpt_dir, args.max_gen_len or 48, prompt,
                              tokenizer_path=args.tokenizer_path)
    return 0


def format_stats(stats: dict) -> str:
    return (f"[stats] {stats['batch_size']} prompt(s), {stats['generated_tokens']} tokens in "
            f"{stats['wall_time_s']:.2f} s ({stats['tokens_per_s']:.1f} tokens/s), {stats['forwards']} forwards, "
            f"{stats['tokens_per_forward']:.2f} tokens/forward per sequence"
            + (f", {stats['shared_prompt_tokens']} prompt tokens shared" if stats.get("shared_prompt_tokens") else "")
            + _speculative_summary(stats))


def _speculative_summary(stats: dict) -> str:
    """'; tree, 4 heads, 47 drafted nodes, acceptance by depth 0.71/0.45/0.20' for speculative runs,
    else '' (drafted nodes as `mtp eval` and tree files count them: the root is not drafted)."""
    if "speculative" not in stats:
        return ""
    rates = "/".join("-" if r is None else f"{r:.2f}" for r in stats["acceptance_per_depth"])
    return (f"; {stats['speculative']}, {stats['heads']} heads, {stats['tree_nodes'] - 1} drafted nodes, "
            f"acceptance by depth {rates}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or an argparse usage error (2, message already printed)
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    # Generated text on a console that cannot show every character (a Windows code page, a pipe with
    # PYTHONIOENCODING=ascii) is escaped, not an error after minutes of generation; the caller's
    # streams get their own setting back afterwards.
    restore = []
    for stream in (sys.stdout, sys.stderr):
        try:
            if hasattr(stream, "reconfigure") and stream.errors in ("strict", "surrogateescape"):
                restore.append((stream, stream.errors))
                stream.reconfigure(errors="backslashreplace")
        except (ValueError, OSError, AttributeError):   # a closed or unusual stream: leave it as it is
            pass
    try:
        return args.run(args)
    except BrokenPipeError:   # the reader left (`mtp complete ... | head`): stop quietly, as a killed writer would
        try:   # Python flushes stdout again at exit: into nothing, not a second error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 128 + 13   # a SIGPIPE death's status
    except (OSError, ValueError, NotImplementedError) as e:   # OSError: a path that exists as the wrong kind
        message = " ".join(str(e).split())
        print(f"mtp {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    finally:
        for stream, errors in restore:
            try:
                stream.reconfigure(errors=errors)
            except (ValueError, OSError):
                pass


if __name__ == "__main__":
    sys.exit(main())

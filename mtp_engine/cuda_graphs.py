"""CUDA graphs for the generator's steps: one graph per (batch-size bucket, step key), captured on
the first call with the real inputs, replayed after; a step that can run several ways is captured
each way and the fastest kept (`CUDAGraphSteps`)."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from mtp_kernels.launch_tuner import TritonError, close_to

from .branches import prepare_stream
from .model import Transformer


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def graph_bucket(rows: int, cache_batch: int) -> int:
    """The batch a CUDA graph of `rows` rows is captured for: the next power of two, at most the
    cache's batch (CUDAGraphSteps)."""
    return min(next_power_of_two(rows), cache_batch)


@dataclass
class _CapturedStep:
    graph: "torch.cuda.CUDAGraph"
    inputs: tuple        # static inputs, (bucket, ...) each
    outputs: tuple       # static outputs, (bucket, ...) each
    keep_alive: tuple    # what the graph reads besides the model (tree buffers)
    variant: Optional[str] = None       # the variant captured (its label), None without variants
    variant_ms: Optional[dict] = None   # where several were captured: replay ms of each, by label


class CUDAGraphSteps:
    """Step functions replayed from CUDA graphs, one per (batch-size bucket, step key).

    A step takes per-row tensors (leading dim R) and returns a tuple of per-row tensors: a whole
    plain or verify step (`Generator._plain_step`, `Generator._verify_step`), greedy or sampled, with
    or without log-probs. R rounds up to a power-of-two bucket (at most the cache's batch): the
    padding rows get zeros, i.e. cache length 0 and not live, so their work lands in their own
    rows' first slots and is ignored. A graph is captured on the first call of its key with the
    real inputs. The inputs are loaded again before every warm-up run, before the capture and before
    every replay, so a step that updates an input in place (the verify step advances the lengths)
    starts from the same state each time; what it writes into the KV cache beyond the lengths is
    rewritten by the real run. All graphs share one memory pool. New caches, a grown rotary table,
    moved weights or a replaced weight (`start_call`) drop every graph, since graphs hold raw
    pointers. So does a call that finds more than MAX_GRAPHS kept (one per step key, a tree's
    included: a server verifying many distinct trees would otherwise keep one for each). A sampled
    step is one too: its noise is keyed by input tensors (seeds, positions), not a generator's state.
    A step that can run several ways gives `variants`, label -> a context that sets the switches
    while the step is traced (a verify step: its head blocks as concurrent branches
    (branches.py) or in order, times one or two reads of the unembedding; on Hopper every step also
    with its kernels launched programmatically, kernels/dependent_launch.py): each is captured, timed
    over a few replays, and the fastest kept (a tie keeps the first listed); a variant whose capture
    fails is left out, with a warning, while another one captures. So is one whose replay does not
    give the first listed variant's results (integers equal, floats within 1%: `close_to`): a way of
    launching that computes wrong values on some GPU (a programmatic launch reading too early, an
    experimental compiler pass) can be the fastest, so the first listed must be the plainest. Which
    wins depends on the GPU and the step's size."""

    WARMUP_RUNS = 2
    # A bound, not a working size: batch buckets (1..64) x plain and verify steps of a few trees
    # stay far under it; only a caller cycling through many distinct trees reaches it.
    MAX_GRAPHS = 256

    def __init__(self, model: Transformer):
        self.model = model
        self._graphs: dict = {}
        self._pool = None
        self._captured_ptrs = None
        self._weights = self._weights_key()
        self._stream = None

    def _weights_key(self) -> tuple:
        return tuple((p.data_ptr(), p.dtype) for p in self.model.parameters())

    def start_call(self) -> None:
        """Generator.generate calls this first, when no step's outputs are in use. Drops every graph
        when any weight is another tensor than at the last call (a block's weight replaced:
        load_state_dict(assign=True), a merged adapter, a swapped layer), since a graph would replay
        the freed address (a few hundred pointer reads, kept out of the per-step check in __call__),
        or when more than MAX_GRAPHS are kept."""
        weights = self._weights_key()
        if weights != self._weights or len(self._graphs) > self.MAX_GRAPHS:
            self._drop_graphs()
            self._weights = weights

    def _drop_graphs(self) -> None:
        """Forget every graph and their memory pool (raw pointers that no longer hold)."""
        self._graphs.clear()
        self._pool = None

    def __call__(self, key: tuple, fn, inputs: tuple, keep_alive: tuple = (), variants=None) -> tuple:
        """Returns fn's outputs for the R = inputs[0].shape[0] rows: views of the graph's output
        buffers, valid until the next call of the same key. variants: None, or a function that
        returns them (called at a capture only: a replay does no Python work for them)."""
        model = self.model
        # A graph holds raw addresses and strides: of the caches, and of the rotary table and weights
        # it read. New caches (a re-sized one may reuse the old address), a grown rotary table
        # (_grow_rope) or moved weights (model.to) mean new graphs.
        ptrs = (model.k_cache.shape, model.k_cache.data_ptr(), model.v_cache.data_ptr(),
                model._rope(inputs[0].device).data_ptr(), model.tok_embeddings.weight.data_ptr(),
                model.output.weight.data_ptr())
        if ptrs != self._captured_ptrs:
            self._drop_graphs()
            self._captured_ptrs = ptrs
        R = inputs[0].shape[0]
        bucket = graph_bucket(R, model.cache_batch)
        key = (bucket, model.concurrent_heads, *key)   # the flag changes what a capture records
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(fn, inputs, bucket, keep_alive,
                                                      variants() if variants is not None else None)
        else:
            self._load(entry.inputs, inputs)
            entry.graph.replay()
        return tuple(out[:R] for out in entry.outputs)

    @staticmethod
    def _load(static: tuple, inputs: tuple) -> None:
        for buffer, value in zip(static, inputs):
            R = value.shape[0]
            buffer[:R].copy_(value)
            if R < buffer.shape[0]:
                buffer[R:].zero_()

    def _capture(self, fn, inputs: tuple, bucket: int, keep_alive: tuple, variants: Optional[dict] = None
                 ) -> _CapturedStep:
        static = tuple(torch.zeros((bucket, *x.shape[1:]), dtype=x.dtype, device=x.device) for x in inputs)

        def load():
            self._load(static, inputs)

        device = inputs[0].device
        variants = variants or {None: contextlib.nullcontext}
        captured, failed = {}, {}
        for label, setting in variants.items():
            try:
                with setting():
                    captured[label] = self._record(lambda: fn(*static), load, device)
            except (RuntimeError, TritonError) as err:   # TritonError: a kernel first compiled here
                failed[label] = err
        if not captured:   # every way failed (or the only one): the caller falls back or raises
            raise next(iter(failed.values()))
        if failed:   # e.g. a driver that cannot capture programmatic launches: the other ways still run
            warnings.warn(f"CUDA graph capture of step variant(s) {sorted(failed)} failed, kept the others: "
                          f"{next(iter(failed.values()))}", stacklevel=2)
        variant_ms = None
        if len(captured) > 1:
            captured = self._agreeing(captured, load)
        if len(captured) > 1:
            variant_ms = {label: self._replay_ms(graph, load) for label, (graph, _) in captured.items()}
            order = list(captured)
            kept = min(order, key=lambda label: (variant_ms[label], order.index(label)))
        else:
            (kept,) = captured
        graph, outputs = captured.pop(kept)
        captured.clear()   # the other graphs and their outputs go back to the shared pool
        load()
        graph.replay()  # capture records the work without running it
        return _CapturedStep(graph, static, outputs, keep_alive, kept, variant_ms)

    @staticmethod
    def _agreeing(captured: dict, load) -> dict:
        """The captured variants whose replay from the loaded inputs gives the first one's outputs:
        integer outputs (tokens, lengths) equal, float ones (hidden states) finite and within 1% in
        norm (`close_to`). The others are left out, with a warning."""
        results = {}
        for label, (graph, outputs) in captured.items():   # each copied out: the graphs share a pool
            load()
            graph.replay()
            results[label] = [out.clone() for out in outputs]
        first, *others = captured
        checks = [close_to(ref) if ref.is_floating_point() else (lambda out, ref=ref: torch.equal(out, ref))
                  for ref in results[first]]
        wrong = [label for label in others if not all(check(out) for check, out in zip(checks, results[label]))]
        if wrong:
            warnings.warn(f"CUDA graph step variant(s) {wrong} gave other results than {first!r} from the same "
                          "inputs: left out", stacklevel=3)
        return {label: entry for label, entry in captured.items() if label not in wrong}

    @staticmethod
    def _replay_ms(graph, load, reps: int = 5) -> float:
        """Median ms of `reps` replays of a captured step, each from the loaded inputs (what a replay
        writes into the caches past the lengths, the real run rewrites)."""
        times = []
        for _ in range(reps):
            load()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[reps // 2]

    def variant_choices(self) -> list:
        """(key, {label: replay ms}, the label kept) of every step captured several ways."""
        return [(key, e.variant_ms, e.variant) for key, e in self._graphs.items() if e.variant_ms]

    def _record(self, run, load, device: torch.device):
        """(graph, outputs): `run` captured as a CUDA graph whose replay rewrites `outputs` in place;
        `load` restores the static inputs before each warm-up run (autotuning happens there).
        Warm-up and capture run on this instance's own stream, prepared before its first capture
        (`branches.prepare_stream`): torch's default capture stream would meet its first split launch
        inside a capture, and every split launch there would get counters zeroed by a memset node of
        its own. The stream is ours, so the current stream comes back even when the capture fails."""
        current = torch.cuda.current_stream(device)
        if self._stream is None:   # one per instance, so the arrival counters kept per stream stay few
            self._stream = torch.cuda.Stream(device=device)
            with torch.cuda.stream(self._stream):
                prepare_stream(device)
        side = self._stream
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP_RUNS):
                    load()
                    run()
        finally:   # also after a failed warm-up: an eager fallback must not race its queued kernels
            current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), torch.cuda.graph(graph, pool=self._pool, stream=side):
            outputs = run()
        self._pool = graph.pool()
        return graph, outputs

"""Head blocks as concurrent CUDA-graph branches (mtp_engine/branches.py).

On the CPU: the fork/join structure against a fake stream API (which stream each call runs on, and
that every branch waits for the main stream before it starts and the main stream for every branch
before it goes on), and the property the branches rest on: a verify forward's head blocks are
independent, so running them in another order changes neither the hidden states nor the caches.
On a GPU: captured concurrent heads give the bits of sequential ones, and streams get their own
arrival counters.
"""
import contextlib

import pytest
import torch

from mtp_engine import branches
from mtp_engine.model import ModelArgs, Transformer


class _FakeCuda:
    """torch.cuda's stream calls as branches.py uses them, logging waits and where work runs."""

    def __init__(self, capturing: bool):
        self.capturing, self.log, self.made = capturing, [], 0
        self.main = self._Stream(self, "main")
        self.current = self.main

    class _Stream:
        def __init__(self, fake, name):
            self.fake, self.name, self.cuda_stream = fake, name, id(self)

        def wait_stream(self, other):
            self.fake.log.append(("wait", self.name, other.name))

    def install(self, monkeypatch):
        def make_stream(device=None):
            self.made += 1
            return self._Stream(self, f"side{self.made}")

        @contextlib.contextmanager
        def use(stream):
            previous, self.current = self.current, stream
            try:
                yield
            finally:
                self.current = previous

        monkeypatch.setattr(torch.cuda, "Stream", make_stream)
        monkeypatch.setattr(torch.cuda, "stream", use)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: self.capturing)
        monkeypatch.setattr(branches, "prepare_stream",
                            lambda device: self.log.append(("prepared", self.current.name)))
        monkeypatch.setattr(branches, "_SIDE_STREAMS", {})

    def call(self, i):
        def run():
            self.log.append(("call", i, self.current.name))
            return i * 10
        return run


CUDA = torch.device("cuda")   # a device object only: nothing here touches a GPU


def test_captured_calls_fork_onto_side_streams_and_join(monkeypatch):
    fake = _FakeCuda(capturing=True)
    fake.install(monkeypatch)
    assert branches.run_branches([fake.call(i) for i in range(3)], CUDA) == [0, 10, 20]
    log = fake.log
    # Streams made on first use are prepared on themselves (counters, cuBLAS), before any work.
    assert log[:2] == [("prepared", "side1"), ("prepared", "side2")]
    for i, side in ((1, "side1"), (2, "side2")):
        fork, run, join = log.index(("wait", side, "main")), log.index(("call", i, side)), \
            log.index(("wait", "main", side))
        assert fork < run < join
    assert ("call", 0, "main") in log
    last_call = max(k for k, entry in enumerate(log) if entry[0] == "call")
    assert min(log.index(("wait", "main", s)) for s in ("side1", "side2")) > last_call
    assert fake.current is fake.main   # back on the main stream afterwards

    fake.log.clear()
    assert branches.run_branches([fake.call(i) for i in range(3)], CUDA) == [0, 10, 20]
    assert fake.made == 2 and ("call", 2, "side2") in fake.log   # the same streams again, no new ones


def test_eager_calls_stay_on_the_current_stream_but_make_the_streams(monkeypatch):
    # Eager (warm-up) calls run in order on one stream, where launch tuners may time new shapes,
    # and leave the side streams ready for the capture that follows.
    fake = _FakeCuda(capturing=False)
    fake.install(monkeypatch)
    assert branches.run_branches([fake.call(i) for i in range(4)], CUDA) == [0, 10, 20, 30]
    assert [e for e in fake.log if e[0] == "call"] == [("call", i, "main") for i in range(4)]
    assert [e for e in fake.log if e[0] == "prepared"] == [("prepared", f"side{i}") for i in (1, 2, 3)]
    assert not [e for e in fake.log if e[0] == "wait"]


@pytest.mark.parametrize("device, concurrent, n", [(CUDA, False, 3), (torch.device("cpu"), True, 3), (CUDA, True, 1)])
def test_sequential_when_off_on_cpu_or_single(monkeypatch, device, concurrent, n):
    fake = _FakeCuda(capturing=True)
    fake.install(monkeypatch)
    assert branches.run_branches([fake.call(i) for i in range(n)], device, concurrent) == [10 * i for i in range(n)]
    assert fake.log == [("call", i, "main") for i in range(n)] and fake.made == 0


def _tree_model():
    torch.manual_seed(3)
    args = ModelArgs(dim=48, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=16,
                     n_future_tokens=4, max_seq_len=32, max_batch_size=3)
    return Transformer(args).eval()


@torch.inference_mode()
def test_head_blocks_are_independent_in_any_order(monkeypatch):
    """A verify forward's heads run in reverse (as concurrent branches may finish in any order):
    the hidden states and every block's cache equal the in-order run's."""
    import mtp_engine.model as model_module

    model = _tree_model()
    model.setup_caches(3, 32)
    seqlens = torch.tensor([0, 5, 11], dtype=torch.int32)
    model.forward_cached(torch.randint(0, 61, (3, 12)), torch.zeros(3, dtype=torch.int32))   # some context
    parents = [-1, 0, 0, 1, 2, 3, 1]
    mask = torch.eye(7, dtype=torch.bool)
    depths = torch.zeros(7, dtype=torch.long)
    for node, parent in enumerate(parents):
        if parent >= 0:
            mask[node] |= mask[parent]
            depths[node] = depths[parent] + 1
    tokens = torch.randint(0, 61, (3, 7))
    before = model.k_cache.clone(), model.v_cache.clone()
    want = model.forward_cached(tokens, seqlens, node_depths=depths, tree_mask=mask)
    want_caches = model.k_cache.clone(), model.v_cache.clone()

    calls = []

    def reversed_order(fns, device, concurrent=True):
        calls.append((len(fns), concurrent))
        out = [None] * len(fns)
        for i in reversed(range(len(fns))):
            out[i] = fns[i]()
        return out

    monkeypatch.setattr(model_module, "run_branches", reversed_order)
    model.k_cache.copy_(before[0])
    model.v_cache.copy_(before[1])
    got = model.forward_cached(tokens, seqlens, node_depths=depths, tree_mask=mask)
    assert calls == [(4, True)]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close((model.k_cache, model.v_cache), want_caches, rtol=0, atol=0)
    # The heads wrote their own caches: the reversed run did not skip a head's cache writes.
    assert all(not torch.equal(want_caches[0][b], before[0][b]) for b in range(len(model.blocks())))

    model.concurrent_heads = False
    model.forward_cached(tokens, seqlens, node_depths=depths, tree_mask=mask)
    assert calls[-1] == (4, False)


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_gpu_streams_get_their_own_arrival_counters():
    from mtp_kernels.arrival import arrival_counters

    device = torch.device("cuda")
    main = arrival_counters(device, 8)
    side = branches.side_streams(device, 2)
    with torch.cuda.stream(side[0]):
        first = arrival_counters(device, 8)
    with torch.cuda.stream(side[1]):
        second = arrival_counters(device, 8)
    ptrs = {main.data_ptr(), first.data_ptr(), second.data_ptr()}
    assert len(ptrs) == 3
    assert arrival_counters(device, 8) is main
    assert branches.side_streams(device, 2) == side


@pytest.mark.gpu
@torch.inference_mode()
def test_gpu_captured_concurrent_heads_equal_sequential_bits():
    """A 4-head verify forward captured as a CUDA graph, heads concurrent and heads in order, against
    the eager forward, bf16 on the Triton kernels: identical bits (every kernel is deterministic
    and the launches were tuned by the eager run)."""
    from mtp_engine.generate import CUDAGraphSteps

    model = _tree_model().to("cuda", torch.bfloat16)
    model.fuse_projections()
    model.setup_caches(3, 32)
    model.forward_cached(torch.randint(0, 61, (3, 12), device="cuda"), torch.zeros(3, dtype=torch.int32, device="cuda"))
    mask = torch.tril(torch.ones(5, 5, dtype=torch.bool, device="cuda"))   # a chain: depth = index
    depths = torch.arange(5, device="cuda")
    tokens = torch.randint(0, 61, (3, 5), device="cuda")
    seqlens = torch.tensor([0, 5, 11], dtype=torch.int32, device="cuda")

    def forward(tokens, seqlens):
        return (model.forward_cached(tokens, seqlens, node_depths=depths, tree_mask=mask, check_lengths=False),)

    want = forward(tokens, seqlens)[0].clone()
    graphs = CUDAGraphSteps(model)
    for concurrent in (True, False, True):
        model.concurrent_heads = concurrent
        for _ in range(2):   # capture, then replay
            got = graphs(("verify-test",), forward, (tokens, seqlens))[0]
            torch.cuda.synchronize()
            assert torch.equal(got, want), concurrent
    assert {key[1] for key in graphs._graphs} == {True, False}
    # Captured both ways and timed (as the Generator's verify steps are): the kept one gives the bits too.
    def heads_way(concurrent):
        @contextlib.contextmanager
        def setting():
            before, model.concurrent_heads = model.concurrent_heads, concurrent
            try:
                yield
            finally:
                model.concurrent_heads = before
        return setting

    variants = {"concurrent": heads_way(True), "in order": heads_way(False)}
    got = graphs(("verify-compared",), forward, (tokens, seqlens), variants=lambda: variants)[0]
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    (choice,) = graphs.variant_choices()
    assert choice[0][2] == "verify-compared" and set(choice[1]) == {"concurrent", "in order"}
    assert min(choice[1].values()) > 0 and choice[2] in ("concurrent", "in order")

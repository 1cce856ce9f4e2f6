"""Programmatic dependent launch (kernels/dependent_launch.py): when launches are programmatic, and a
whole decode step launched that way under the interpreter (every Triton kernel of the step asks
for it, and the logits keep their bits). The wait itself is PTX that only a GPU runs
(`test_gpu_programmatic_decode_step_in_a_graph`)."""
import collections
import os

import pytest
import torch

from mtp_engine.model import ModelArgs, Transformer
from mtp_kernels import dependent_launch, skinny_fused, skinny_linear, skinny_ws
from mtp_kernels.dependent_launch import launch_programmatic, programmatic_launch, programmatic_supported

from _decode_steps import recorded_decode_step


def test_launches_are_programmatic_only_inside_the_switch_on_hopper(monkeypatch):
    cpu = torch.device("cpu")
    assert not launch_programmatic(cpu)
    with programmatic_launch():
        assert not launch_programmatic(cpu)   # a CPU tensor, interpreted or not: no grid to wait for
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("MTP_CROSS_COMPILE", "90")   # compile_check: CPU tensors stand for an sm_90 GPU
    assert programmatic_supported(cpu) and not launch_programmatic(cpu)
    monkeypatch.setenv("MTP_PDL", "0")   # switched off everywhere
    assert not programmatic_supported(cpu)
    monkeypatch.delenv("MTP_PDL")
    with programmatic_launch():
        assert launch_programmatic(cpu)
        with programmatic_launch(False):
            assert not launch_programmatic(cpu)
        assert launch_programmatic(cpu)
    assert not launch_programmatic(cpu)
    monkeypatch.setenv("MTP_CROSS_COMPILE", "80")   # Ampere has no programmatic launch
    with programmatic_launch():
        assert not launch_programmatic(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MTP_CROSS_COMPILE", "90")
    assert not programmatic_supported(cpu)   # the interpreter runs no PTX


def _small_model():
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                     n_future_tokens=2, max_seq_len=32, max_batch_size=2)
    model = Transformer(args).eval()
    model.fuse_projections()
    model.setup_caches(2, 32)
    return model


def test_decode_step_launches_every_kernel_programmatically_with_the_same_logits(triton_backend, monkeypatch):
    """Inside `programmatic_launch()` on a device that supports it, every Triton kernel of a decode
    step (the fused q/k/v GEMM with its rotary epilogue, KV attention, split-K and SwiGLU GEMMs,
    the add + norm kernels) is launched with launch_pdl and its PDL constexpr, and the step's logits
    are the bits of the ordinary launches: the skinny GEMMs' early first weight tile changes no sum."""
    monkeypatch.setenv("MTP_TUNE", "0")
    model = _small_model()
    tokens = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    # Launches the tuners would keep on a GPU: a split-K tile with an empty split for the plain GEMMs,
    # and tiles with the SwiGLU and rotary epilogues.
    split = skinny_linear.SkinnyLaunch(16, 16, True, 1, 1, 16, split_k=4)
    paired = skinny_linear.SkinnyLaunch(16, 16, True, 1, 1, 16)
    monkeypatch.setattr(skinny_linear._TUNER, "choose", lambda *args: split)
    monkeypatch.setattr(skinny_fused._SWIGLU_TUNER, "choose", lambda *args: paired)
    monkeypatch.setattr(skinny_fused._ROPE_TUNER, "choose", lambda *args: paired)
    launches = []

    def step():
        launches.clear()
        return recorded_decode_step(model, tokens, 1, lambda name, kwargs: launches.append(
            (name, kwargs.get("PDL"), kwargs.get("launch_pdl"))))

    with torch.no_grad():
        ordinary = step()
        assert launches and all(pdl is False and not launch_pdl for _, pdl, launch_pdl in launches), launches
        monkeypatch.setattr(dependent_launch, "programmatic_supported", lambda device: True)
        with programmatic_launch():
            programmatic = step()
    kernels = collections.Counter(name for name, _, _ in launches)
    assert {"_skinny_linear_kernel", "_kv_attn_kernel", "_add_rms_norm_fwd_kernel"} <= set(kernels), kernels
    assert all(pdl is True and launch_pdl is True for _, pdl, launch_pdl in launches), launches
    assert torch.equal(programmatic, ordinary)


@pytest.mark.gpu
@pytest.mark.parametrize("batch,launch", [
    (1, skinny_linear.SkinnyLaunch(16, 256, False, 4, 4)),                       # one row: multiply-add
    (3, skinny_linear.SkinnyLaunch(32, 128, True, 4, 3, 16, split_k=4)),         # tl.dot, split-K
    (17, skinny_linear.ws_tiles(32, gpu=True)[0]),     # TMA-fed, warp-specialized: swapped 64 x 128
    (33, skinny_linear.ws_tiles(64, gpu=True)[1]),     # the same, 64 rows, split in 2
])
def test_gpu_programmatic_decode_step_in_a_graph(monkeypatch, batch, launch):
    """On Hopper, a bf16 decode step whose kernels are programmatic dependent launches (the skinny
    GEMMs plain and with both epilogues, KV attention, the norms) gives the ordinary launches'
    logits, eagerly and replayed from a CUDA graph, the same bits at every replay. The
    warp-specialized tiles wait in their default warp group while Triton's producer warps issue the
    TMA loads: this is their only GPU check with programmatic launches."""
    device = torch.device("cuda")
    if not programmatic_supported(device):
        pytest.skip("programmatic dependent launch needs compute capability 9 or more")
    if launch.ws:
        monkeypatch.setenv("MTP_SKINNY_WS", os.environ.get("MTP_SKINNY_WS") or "1")   # gpu_check.sh's choice, if any
        if not skinny_ws.skinny_ws_allowed(device) or not skinny_ws.skinny_ws_offered(launch.tile_id()):
            pytest.skip("warp-specialized tile not offered here (not Hopper, or it failed its own GPU test)")
    decode_rows = skinny_linear.row_tile(batch)   # the prefill's rows (8 a sequence) get cuBLAS

    def chooser(tile):
        return lambda key, *args: tile if key[2] == decode_rows else None

    monkeypatch.setattr(skinny_linear._TUNER, "choose", chooser(launch))
    monkeypatch.setattr(skinny_fused._SWIGLU_TUNER, "choose", chooser(skinny_fused.swiglu_twin(launch)))
    monkeypatch.setattr(skinny_fused._ROPE_TUNER, "choose", chooser(skinny_fused.rope_twin(launch)))
    torch.manual_seed(0)
    args = ModelArgs(dim=512, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=1000, multiple_of=64,
                     n_future_tokens=2, max_seq_len=64, max_batch_size=batch)
    model = Transformer(args).eval().to(device, torch.bfloat16)
    model.fuse_projections()
    model.setup_caches(batch, 64)
    tokens = torch.randint(0, 1000, (batch, 9), device=device)
    lengths = torch.zeros(batch, dtype=torch.int32, device=device)

    def step():
        return model.forward_cached(tokens[:, 8:], lengths + 8, n_heads=1, check_lengths=False)

    with torch.no_grad():
        model.forward_cached(tokens[:, :8], lengths, n_heads=1, check_lengths=False)
        ordinary = step()
        with programmatic_launch():
            eager = step()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                step()   # warm-up outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = step()
        replays = []
        for _ in range(3):
            graph.replay()
            replays.append(captured.clone())
    torch.cuda.synchronize()
    assert torch.isfinite(ordinary).all()
    for got in (eager, *replays):
        torch.testing.assert_close(got, ordinary, rtol=2e-2, atol=2e-2)
    assert all(torch.equal(r, replays[0]) for r in replays)

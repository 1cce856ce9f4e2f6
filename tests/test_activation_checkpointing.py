"""Activation checkpointing (Transformer.set_activation_checkpointing, `mtp train
--activation-checkpointing`): each block keeps only its inputs for the backward, which runs the
block's forward again, so autograd holds far less between forward and backward and the losses and
gradients do not change. Both paths: the reference (CPU) and the Triton kernels under the
interpreter."""
from pathlib import Path

import pytest
import torch

from mtp_engine.loss import MTPLoss
from mtp_engine.model import ModelArgs, Transformer
from mtp_engine.train import MTPTrainModel
from mtp_kernels import fused_linear_cross_entropy


@pytest.fixture(params=["reference", "triton"])
def path(request):
    if request.param == "triton":
        request.getfixturevalue("triton_backend")
    return request.param


def _model(seed=0, n_layers=5):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                                 max_seq_len=64, n_future_tokens=2))


def _tokens(B=2, T=37, seed=1):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_checkpointed_blocks_give_the_same_loss_and_gradients_and_keep_far_less(path, load_script):
    """Batched schedule: the same loss and every parameter's gradient, bit for bit (the same ops on the
    same inputs run again), while autograd keeps under a quarter of the activation bytes (counted as
    bench_train_step.py counts them: common.saved_activation_bytes)."""
    common = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "common.py")
    model, tokens = _model(), _tokens()
    loss_fn = MTPLoss(2, head_weights=[1.0, 0.5])
    runs = []
    for checkpointed in (False, True):
        model.set_activation_checkpointing(checkpointed)
        model.zero_grad()
        losses = []
        kept = common.saved_activation_bytes(model, lambda: losses.append(
            loss_fn(model.head_hidden(tokens), model.output.weight, tokens).loss))
        loss = losses[0]
        loss.backward()
        runs.append((loss.detach(), _grads(model), kept))
    (plain_loss, plain_grads, plain_kept), (loss, grads, kept) = runs
    assert torch.equal(loss, plain_loss)
    for name, grad in plain_grads.items():
        assert torch.equal(grads[name], grad), name
    assert kept < 0.25 * plain_kept, (kept, plain_kept)


def test_checkpointing_under_the_sequential_schedule(path):
    """The paper's head-by-head schedule (a backward per head inside the step, then the trunk's) with
    checkpointed blocks: the batched schedule's gradients."""
    model, tokens = _model(), _tokens(T=23)
    module = MTPTrainModel(model, head_weights=[1.0, 0.25])
    module(tokens).loss.backward()
    want = _grads(model)
    model.zero_grad()
    model.set_activation_checkpointing(True)
    result = module.forward_backward_sequential(tokens)
    for name, grad in want.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-5, atol=1e-6, msg=name)
    assert result.per_head.shape == (2,)


def test_inference_is_untouched():
    """No autograd, or a KV-cache step: the blocks run as they are (nothing to keep for a backward),
    with the same logits; evaluation under no_grad takes no checkpoint."""
    model, tokens = _model(n_layers=3), _tokens(B=1, T=9)
    with torch.no_grad():
        want = model(tokens, return_all_heads=True)
    model.set_activation_checkpointing(True)
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    torch.utils.checkpoint.checkpoint = counting
    try:
        with torch.no_grad():
            got = model(tokens, return_all_heads=True)
        model.setup_caches(1, 16)
        cached = model(tokens, start_pos=0, return_all_heads=True)
        model.clear_caches()
        model(tokens).sum().backward()   # a training forward does checkpoint (the count below)
    finally:
        torch.utils.checkpoint.checkpoint = real
    assert torch.equal(got, want)
    torch.testing.assert_close(cached, want, rtol=1e-5, atol=1e-5)
    assert len(calls) == len(model.blocks()) - 1   # the training forward: trunk + head 0 (return_all_heads off)


def test_the_switch_is_checked_and_leaves_the_state_dict_alone():
    """The flag is checked and changes no state dict; a checkpointed training step runs the hooks on
    a block's submodules twice (forward and recompute) and those on the block once, as the docs say."""
    model = _model(n_layers=3)
    calls = {"block": 0, "attention": 0}
    block = model.layers[0]
    block.register_forward_hook(lambda *args: calls.__setitem__("block", calls["block"] + 1))
    block.attention.register_forward_hook(lambda *args: calls.__setitem__("attention", calls["attention"] + 1))
    model.set_activation_checkpointing(True)
    MTPLoss(2)(model.head_hidden(_tokens(T=9)), model.output.weight, _tokens(T=9)).loss.backward()
    assert calls == {"block": 1, "attention": 2}
    model.set_activation_checkpointing(False)
    keys = list(model.state_dict())
    model.set_activation_checkpointing(True)
    assert all(block.checkpoint_activations for block in model.blocks())
    assert list(model.state_dict()) == keys
    model.set_activation_checkpointing(False)
    assert not any(block.checkpoint_activations for block in model.blocks())
    with pytest.raises(ValueError, match="enabled must be True or False, got 1"):
        model.set_activation_checkpointing(1)


def test_a_compiled_checkpointed_step_traces_whole_and_gives_eager_gradients(path):
    """torch.compile(fullgraph=True) over a step with checkpointed blocks (Dynamo's checkpoint
    operator, AOTAutograd's recompute): the eager, unchecked step's loss and gradients."""
    import torch._dynamo

    torch._dynamo.reset()
    model, tokens = _model(n_layers=3), _tokens(T=16)

    def step():
        return MTPLoss(2)(model.head_hidden(tokens), model.output.weight, tokens).loss
    eager_loss = step()
    eager_loss.backward()
    want = _grads(model)
    model.zero_grad()
    model.set_activation_checkpointing(True)
    try:
        loss = torch.compile(step, fullgraph=True, backend="aot_eager")()
        loss.backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(loss.detach(), eager_loss.detach(), rtol=1e-6, atol=1e-7)
    for name, grad in want.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_fused_loss_inside_a_users_checkpoint(path):
    """A user who checkpoints a region that ends in the fused loss (it computes its gradients in the
    forward, so the region's recompute runs it twice) gets the plain call's loss and gradients."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 37, 16, generator=g)
    weight = torch.randn(101, 16, generator=g) / 4
    targets = torch.randint(0, 101, (2, 37), generator=g)
    targets[1, :5] = -100
    runs = []
    for checkpointed in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

        def region(h, w):
            return fused_linear_cross_entropy(torch.tanh(h), w, targets, head_weights=[1.0, 0.5])
        loss = torch.utils.checkpoint.checkpoint(region, h, w, use_reentrant=False) if checkpointed else region(h, w)
        (2.0 * loss).backward()
        runs.append((loss.detach(), h.grad, w.grad))
    for got, want in zip(runs[1], runs[0]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_gpu_checkpointed_bf16_step_equals_the_plain_step():
    """On the GPU kernels under bf16 autocast (flash attention forward again inside the backward, the
    fused loss, the norms): the plain step's loss and gradients, and less memory at the step's peak."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=256, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=64,
                                  max_seq_len=512, n_future_tokens=4)).to(device)
    model.freqs_cis = model.freqs_cis.to(device)
    module = MTPTrainModel(model)
    tokens = torch.randint(0, 1000, (4, 509), device=device)
    runs = []
    for checkpointed in (False, True):
        model.set_activation_checkpointing(checkpointed)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module(tokens).loss
        loss.backward()
        torch.cuda.synchronize()
        runs.append((loss.detach(), _grads(model), torch.cuda.max_memory_allocated() - base))
    (plain_loss, plain_grads, plain_peak), (loss, grads, peak) = runs
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=2e-3, atol=2e-5, msg=name)
    assert peak < plain_peak, (peak, plain_peak)

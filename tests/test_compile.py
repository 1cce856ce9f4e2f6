"""torch.compile and meta tensors: the training path's kernels are torch.library custom ops (the fused
loss, RMSNorm, flash attention, SwiGLU, the residual add + norm), so a compiled training step or
evaluation forward traces whole (fullgraph=True) and gives eager's results, and meta tensors give
shapes. Both paths: the reference (CPU) and the Triton kernels under the interpreter."""
import re
import shutil

import pytest
import torch

from mtp_engine.loss import MTPLoss
from mtp_engine.model import ModelArgs, Transformer
from mtp_kernels import add_rms_norm, fused_linear_cross_entropy, rms_norm, swiglu
from mtp_kernels.attention import flash_attention

IGNORE = -100


@pytest.fixture(params=["reference", "triton"])
def path(request):
    """Each test once on the reference path and once on the interpreted Triton kernels. Dynamo does
    not guard on MTP_BACKEND, so graphs compiled for the other path are dropped first."""
    import torch._dynamo

    if request.param == "triton":
        request.getfixturevalue("triton_backend")
    torch._dynamo.reset()
    yield request.param
    torch._dynamo.reset()


def _model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                                 max_seq_len=32, n_future_tokens=2))


def _loss_inputs(n=2, N=7, D=8, V=53, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, N, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) / D ** 0.5).to(dtype)
    targets = torch.randint(0, V, (n, N), generator=g)
    targets[0, 1] = targets[1, 4] = IGNORE
    return hidden, weight, targets


def _eager_and_compiled(fn, *leaves, backward_scale=1.0, **compile_kwargs):
    """[(result, grads of leaves)] for fn eagerly and compiled fullgraph (aot_eager: Dynamo, the ops'
    shape functions and AOTAutograd, without a C++ compiler)."""
    runs = []
    for f in (fn, torch.compile(fn, fullgraph=True, **{"backend": "aot_eager", **compile_kwargs})):
        xs = [x.detach().clone().requires_grad_() for x in leaves]
        out = f(*xs)
        (out.float() * backward_scale).sum().backward()
        runs.append((out.detach(), [x.grad for x in xs]))
    return runs


def _model_step_runs(model, step, **compile_kwargs):
    """[(loss, {name: grad})] of a training step eagerly and compiled fullgraph (Inductor unless the
    kwargs name another backend)."""
    runs = []
    for fn in (step, torch.compile(step, fullgraph=True, **compile_kwargs)):
        loss = fn()
        loss.backward()
        runs.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
        model.zero_grad()
    return runs


def test_a_compiled_training_step_traces_whole_and_gives_eager_loss_and_gradients(path):
    """The model's forward, the n-head loss and backward in one graph (fullgraph=True failed before:
    the Triton launches, the loss among them, were graph breaks run eagerly)."""
    model = _model()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))

    def step():
        return MTPLoss(2, head_weights=[1.0, 0.5])(model.head_hidden(tokens), model.output.weight, tokens).loss
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = _model_step_runs(model, step, backend="aot_eager")
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-7)
    for name, grad in eager_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert torch._dynamo.explain(step)().graph_break_count == 0


def test_a_compiled_evaluation_forward_traces_whole(path):
    """Without autograd the model's blocks take their inference launches (the residual add + norm,
    SwiGLU) and, eagerly, the skinny-GEMM/CPU-layout projections: under compile those give way to
    F.linear, which the compiler plans."""
    model = _model()
    tokens = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(tokens, return_all_heads=True)
        got = torch.compile(lambda: model(tokens, return_all_heads=True), backend="aot_eager", fullgraph=True)()
    assert want.shape == (2, 11, 2, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_compiled_loss_equals_eager_for_every_reduction(path, reduction):
    """Head weights as a list and as a tensor, z-loss, label smoothing, softcap, ignored targets; a
    backward factor (a 1/k, a loss scale) multiplies in as it does eagerly."""
    hidden, weight, targets = _loss_inputs()
    for head_weights in ([0.3, 1.2], torch.tensor([0.7, 0.4])):
        def loss(h, w):
            return fused_linear_cross_entropy(torch.tanh(h), w, targets, reduction=reduction, head_weights=head_weights,
                                              z_loss=1e-3, label_smoothing=0.1, softcap=4.0)
        (want, want_grads), (got, got_grads) = _eager_and_compiled(loss, hidden, weight, backward_scale=0.25)
        assert got.shape == want.shape == (() if reduction != "none" else targets.shape)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_the_compiled_loss_takes_the_autocast_dtype_it_was_traced_under(path):
    """A compiled graph runs its ops with autocast off: the loss takes the dtype read while tracing,
    so float32 master weights under bf16 autocast give eager's (bf16-matmul) loss and gradients, not a
    float32 loss."""
    hidden, weight, targets = _loss_inputs(V=37)

    def loss(h, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused_linear_cross_entropy(h, w, targets)
    (want, want_grads), (got, got_grads) = _eager_and_compiled(loss, hidden, weight)
    with torch.no_grad():
        float32_loss = fused_linear_cross_entropy(hidden, weight, targets)
    assert got == want and got != float32_loss
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_a_compiled_fp16_loss_scaled_by_a_grad_scaler_does_not_overflow():
    """The backward factor multiplies the saved fp16 gradients in float32 and rounds once, as eager
    does: 65536 (inf in fp16) on the way would overflow."""
    import torch._dynamo

    torch._dynamo.reset()
    hidden, weight, targets = _loss_inputs(dtype=torch.float16)

    def loss(h, w):
        return fused_linear_cross_entropy(h, w, targets, accum_dtype=None)
    (_, want_grads), (_, got_grads) = _eager_and_compiled(loss, hidden, weight, backward_scale=65536.0)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == torch.float16 and torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_a_compiled_loss_may_be_differentiated_twice():
    """Eagerly a mean/sum loss hands out the gradients its forward made, once (a second backward
    is refused); compiled, each backward multiplies them anew, so retain_graph gives twice the
    gradient."""
    import torch._dynamo

    torch._dynamo.reset()
    hidden, weight, targets = _loss_inputs()
    h = hidden.clone().requires_grad_()
    loss = torch.compile(lambda h: fused_linear_cross_entropy(h, weight, targets), backend="aot_eager",
                         fullgraph=True)(h)
    loss.backward(retain_graph=True)
    once = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * once)


def test_bad_input_under_compile_is_named(path):
    """The data-free checks run in the traced code: without fullgraph a failed one is the plain
    ValueError, with fullgraph it is the compile error's cause; the token-id check runs in the op, on
    the data, and raises as it does eagerly."""
    import torch._dynamo

    hidden, weight, targets = _loss_inputs()

    def loss(h, w, t, **kwargs):
        return fused_linear_cross_entropy(h, w, t, **kwargs)
    cases = [((hidden, weight[:, :5], targets), {}, "weight has D=5 but hidden has D=8"),
             ((hidden, weight, targets.float()), {}, "targets must be an integer tensor"),
             ((hidden, weight, targets), dict(head_weights=[1.0]), "head_weights has 1 entries but there are 2 heads"),
             ((hidden, weight, targets), dict(label_smoothing=2.0), r"label_smoothing must be a number in \[0, 1\)"),
             ((hidden, weight, targets), dict(accum_dtype=torch.float16), "accum_dtype must be None or a float dtype")]
    for args, kwargs, match in cases:
        torch._dynamo.reset()
        with pytest.raises(ValueError, match=match):
            torch.compile(loss, backend="aot_eager")(*args, **kwargs)
        torch._dynamo.reset()
        with pytest.raises(Exception) as info:
            torch.compile(loss, backend="aot_eager", fullgraph=True)(*args, **kwargs)
        chain, error = [], info.value
        while error is not None:
            chain.append(str(error))
            error = error.__cause__
        assert any(re.search(match, text) for text in chain), chain
    torch._dynamo.reset()
    bad = targets.clone()
    bad[1, 2] = 53
    with pytest.raises(ValueError, match="targets contain token id 53"):
        torch.compile(loss, backend="aot_eager", fullgraph=True)(hidden, weight, bad)
    with pytest.raises(ValueError, match="head_weights must be a sequence of finite numbers >= 0"):
        torch.compile(loss, backend="aot_eager", fullgraph=True)(hidden, weight, targets,
                                                                 head_weights=torch.tensor([1.0, -1.0]))


def test_dynamic_shapes_and_options_that_change_between_calls(path):
    """torch.compile(dynamic=True), and a compiled function called with another ignore_index, label
    smoothing or head-weight list (a schedule): Dynamo makes such arguments symbolic (SymInt,
    SymFloat) on a recompile, and the checks take them (they raised, or could not be traced)."""
    import torch._dynamo

    hidden, weight, targets = _loss_inputs(V=13)
    targets = targets.clamp(min=0)   # ids only: ignore_index varies
    targets[0, 0], targets[1, 2] = 3, 5

    def loss(h, ignore_index, label_smoothing, head_weights):
        return fused_linear_cross_entropy(h, weight, targets, ignore_index=ignore_index,
                                          label_smoothing=label_smoothing, head_weights=head_weights)
    for dynamic in (None, True):
        torch._dynamo.reset()
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True, dynamic=dynamic)
        for options in ((-100, 0.0, [1.0, 0.5]), (3, 0.1, [1.0, 0.25]), (5, 0.2, [0.5, 0.5])):
            torch.testing.assert_close(compiled(hidden, *options), loss(hidden, *options), rtol=1e-6, atol=1e-7)
    model = _model()
    step = torch.compile(lambda t: MTPLoss(2)(model.head_hidden(t), model.output.weight, t).loss,
                         backend="aot_eager", fullgraph=True, dynamic=True)
    for length in (16, 9):
        tokens = torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(length))
        torch.testing.assert_close(step(tokens), MTPLoss(2)(model.head_hidden(tokens), model.output.weight,
                                                            tokens).loss, rtol=1e-5, atol=1e-6)


def test_numpy_options_under_compile():
    """Eager takes numpy's numbers as options; compiled too (Dynamo traces a numpy scalar as a tensor,
    which no kernel argument takes, and a numpy array's tolist). (np.float32 scalars under fullgraph
    are left out: torch's own symbolic floats fail on them.)"""
    import numpy as np
    import torch._dynamo

    hidden, weight, targets = _loss_inputs(V=13)
    targets = targets.clamp(min=0)
    targets[0, 0] = 3
    for options in (dict(label_smoothing=np.float64(0.1)), dict(softcap=np.float64(5.0)),
                    dict(ignore_index=np.int64(3)), dict(head_weights=np.array([1.0, 0.5])),
                    dict(head_weights=[np.float64(1.0), np.float64(0.5)]), dict(z_loss=np.float32(1e-3))):
        want = fused_linear_cross_entropy(hidden, weight, targets, **options)
        for fullgraph in (False, True):
            if fullgraph and options.get("z_loss") is not None:
                continue
            torch._dynamo.reset()
            got = torch.compile(lambda h: fused_linear_cross_entropy(h, weight, targets, **options),
                                backend="aot_eager", fullgraph=fullgraph)(hidden)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=f"{options} fullgraph={fullgraph}")


def test_the_loss_shape_function_agrees_with_the_op_on_the_reference_path():
    """opcheck on the reference chunk, edge layouts included: no rows (dW made as zeros: contiguous,
    as the shape function says, also for a transposed weight view), a transposed weight, one head."""
    from mtp_kernels.linear_ce_op import linear_ce_forward

    g = torch.Generator().manual_seed(7)
    base = torch.randn(8, 11, generator=g)
    options = (IGNORE, "mean", 0.0, 0.0, None, torch.float32, 1 << 20, None, True, True)
    for hidden, weight, targets in ((torch.randn(2, 0, 8, generator=g), base.t(), torch.zeros(2, 0, dtype=torch.long)),
                                    (torch.randn(2, 3, 8, generator=g), base.t(), torch.randint(0, 11, (2, 3))),
                                    (torch.randn(5, 8, generator=g), base.t().contiguous(), torch.randint(0, 11, (5,)))):
        torch.library.opcheck(linear_ce_forward, (hidden.requires_grad_(), weight.detach().requires_grad_(), targets,
                                                  None, *options))


def test_the_kernels_folder_imports_under_both_names():
    """From the repo root the folder is importable as `kernels` beside the installed `mtp_kernels`: each
    registers its ops in its own namespace (one namespace raised "registered multiple times")."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ("import torch, mtp_kernels, kernels.rmsnorm\n"
              "print(torch.ops.mtp_kernels.rms_norm.default, torch.ops.kernels.rms_norm.default)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "mtp_kernels.rms_norm" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_meta_tensors_give_the_loss_and_gradient_shapes(reduction):
    """Meta tensors have no ids to check or data to compute on: the loss's shape function answers."""
    hidden, weight, targets = (t.to("meta") for t in _loss_inputs(dtype=torch.bfloat16))
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss, per_head = fused_linear_cross_entropy(h, w, targets, reduction=reduction, return_per_head=True)
    assert loss.is_meta and loss.shape == (() if reduction == "mean" else targets.shape)
    assert loss.dtype == per_head.dtype == torch.float32 and per_head.shape == (2,)
    loss.sum().backward()
    assert (h.grad.shape, h.grad.dtype, w.grad.shape, w.grad.dtype) == (h.shape, h.dtype, w.shape, w.dtype)


def test_a_model_on_meta_tensors_gives_every_gradient_its_parameter_shape():
    """A model built on the meta device (to size a configuration without memory) runs a training step."""
    with torch.device("meta"):
        model = Transformer(ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                                      max_seq_len=32, n_future_tokens=2))
    tokens = torch.zeros(2, 16, dtype=torch.long, device="meta")
    MTPLoss(2)(model.head_hidden(tokens), model.output.weight, tokens).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name


def test_the_custom_ops_pass_torch_s_opcheck(triton_backend):
    """torch.library.opcheck: schemas, shape functions against the real kernels' outputs (shapes,
    dtypes, strides), autograd registrations, and AOT dispatch, for every op on the interpreted
    kernels (odd lengths, GQA)."""
    from mtp_kernels.attention import _flash_attention_op
    from mtp_kernels.linear_ce_op import linear_ce_backward, linear_ce_forward
    from mtp_kernels.rmsnorm import _add_rms_norm_op, _rms_norm_op
    from mtp_kernels.swiglu import _swiglu_op

    g = torch.Generator().manual_seed(3)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=g).requires_grad_(grad)
    hidden, weight, targets = _loss_inputs(N=5, V=37)
    loss_options = (IGNORE, 0.1, 1e-3, 4.0, torch.float32, 1 << 20, None)
    for reduction, head_weights in (("mean", None), ("sum", torch.tensor([0.5, 2.0])),
                                    ("none", torch.tensor([1.0, 3.0]))):
        torch.library.opcheck(linear_ce_forward, (hidden.clone().requires_grad_(), weight.clone().requires_grad_(),
                                                  targets, head_weights, *loss_options[:1], reduction,
                                                  *loss_options[1:], True, True))
    torch.library.opcheck(linear_ce_backward, (torch.rand(2, 5, generator=g), hidden, weight, targets, None,
                                               *loss_options, True, False))
    torch.library.opcheck(_rms_norm_op, (rand(3, 5, 24), rand(24), 1e-6))
    torch.library.opcheck(_flash_attention_op, (rand(1, 19, 4, 16), rand(1, 19, 2, 16), rand(1, 19, 2, 16), True, 0.25))
    torch.library.opcheck(_swiglu_op, (rand(3, 40, grad=False), rand(3, 40, grad=False)))
    torch.library.opcheck(_add_rms_norm_op, (rand(2, 3, 24, grad=False), rand(2, 3, 24, grad=False),
                                             rand(24, grad=False), 1e-5))


def test_the_training_kernels_trace_whole_on_their_own(path):
    """Each public function of the training path in a fullgraph compile, eager's results and gradients."""
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(2, 5, 24, generator=g), torch.randn(24, generator=g)
    (want, want_grads), (got, got_grads) = _eager_and_compiled(lambda x, w: rms_norm(x, w, 1e-5), x, w)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    q, k, v = torch.randn(1, 13, 4, 16, generator=g), torch.randn(1, 13, 2, 16, generator=g), \
        torch.randn(1, 13, 2, 16, generator=g)
    (want, want_grads), (got, got_grads) = _eager_and_compiled(lambda q, k, v: flash_attention(q, k, v), q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        gate, up, res = (torch.randn(3, 40, generator=g) for _ in range(3))
        fn = torch.compile(lambda a, b: (swiglu(a, b), add_rms_norm(a, b, res[0], 1e-6)), backend="aot_eager",
                           fullgraph=True)
        for got, want in zip(torch.utils._pytree.tree_leaves(fn(gate, up)),
                             torch.utils._pytree.tree_leaves((swiglu(gate, up), add_rms_norm(gate, up, res[0], 1e-6)))):
            torch.testing.assert_close(got, want)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's default backend (Inductor) needs a C++ compiler on the CPU")
def test_an_inductor_compiled_training_step_gives_eager_loss_and_gradients(path):
    """The default backend, which generates code around the ops (their shape functions' strides are
    what its buffers assume): on the interpreted kernels every op of the step is among them."""
    model = _model()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))

    def step():
        return MTPLoss(2)(model.head_hidden(tokens), model.output.weight, tokens).loss
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = _model_step_runs(model, step)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, want in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
def test_gpu_inductor_compiled_bf16_training_step_equals_eager():
    """On CUDA the ops run the real Triton kernels (flash attention with head dim 64, the loss's
    chunk kernel, RMSNorm) inside an Inductor graph, under bf16 autocast over float32 master
    weights: the loss and the gradients equal eager's up to bf16 rounding (the compiler fuses the
    elementwise work between the ops in its own order)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(6)
    model = Transformer(ModelArgs(dim=256, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=64,
                                  max_seq_len=256, n_future_tokens=2)).cuda()
    tokens = torch.randint(0, 1000, (2, 200), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return MTPLoss(2)(model.head_hidden(tokens), model.output.weight, tokens).loss
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = _model_step_runs(model, step)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=2e-2, atol=2e-2)
    for name, want in eager_grads.items():
        got = compiled_grads[name]
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), name
        cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
        assert cosine > 0.99, (name, cosine)

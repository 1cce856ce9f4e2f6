"""Fused n-head linear cross-entropy vs a naive float64 oracle, on both paths."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mtp_kernels import fused_linear_cross_entropy, reference

IGNORE = -100


def naive_loss(hidden, weight, targets, *, ignore_index=IGNORE, reduction="mean", head_weights=None,
               label_smoothing=0.0, z_loss=0.0, softcap=None):
    """Unfused oracle: materialize every head's logits (float64 in the tests)."""
    single = hidden.dim() == 2
    h = hidden.unsqueeze(0) if single else hidden
    t = targets.unsqueeze(0) if single else targets
    n, N, _ = h.shape
    lam = [1.0] * n if head_weights is None else list(head_weights)
    per_head = []
    for i in range(n):
        z = h[i] @ weight.T
        s = softcap * torch.tanh(z / softcap) if softcap is not None else z
        valid = t[i] != ignore_index
        lse = torch.logsumexp(s, dim=1)
        ce = F.cross_entropy(s, t[i], ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
        tok = torch.where(valid, ce + z_loss * lse * lse, torch.zeros_like(ce))
        per_head.append(lam[i] * tok)
    tok = torch.stack(per_head)
    if reduction == "none":
        return tok[0] if single else tok
    if reduction == "sum":
        return tok.sum()
    counts = (t != ignore_index).sum(1).clamp(min=1)
    return (tok.sum(1) / counts).sum()


def make_inputs(n, N, D, V, dtype=torch.float32, ignore_frac=0.2, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, N, D, generator=g, dtype=torch.float64) * scale).to(dtype)
    weight = (torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5).to(dtype)
    targets = torch.randint(0, V, (n, N), generator=g)
    targets[torch.rand(n, N, generator=g) < ignore_frac] = IGNORE
    return hidden, weight, targets


def check_against_oracle(n, N, D, V, budget_rows, grad_seed=1, rtol=1e-4, **opts):
    hidden, weight, targets = make_inputs(n, N, D, V)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fused_linear_cross_entropy(h, w, targets, max_scratch_bytes=budget_rows * V * 4, **opts)
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    ref = naive_loss(h64, w64, targets, **opts)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(g.float())
    ref.backward(g)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=rtol, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=rtol, atol=1e-5)


OPTION_SETS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"head_weights": [1.0, 0.5, 0.25, 0.125]},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-2},
    {"softcap": 3.0},
    {"label_smoothing": 0.05, "z_loss": 1e-3, "softcap": 5.0, "reduction": "none", "head_weights": [2, 1, 1, 0.5]},
]


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_cpu_path_matches_oracle(opts):
    check_against_oracle(4, 37, 24, 1001, budget_rows=16, **opts)


@pytest.mark.parametrize("V", [201, 301], ids=["one_pass", "streamed"])
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_triton_path_matches_oracle(triton_backend, opts, V):
    # Small under the interpreter: it runs one program (one row) at a time. A row of 201 fits one
    # tile there (the kernel keeps it in registers); 301 is streamed in two passes.
    check_against_oracle(4, 5, 16, V, budget_rows=8, **opts)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_single_head_and_odd_shapes(request, backend):
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    N, D, V = (37, 33, 1001) if backend == "cpu" else (7, 9, 131)
    hidden, weight, targets = make_inputs(1, N, D, V)
    h = hidden[0].clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, targets[0], max_scratch_bytes=3 * V * 4)
    loss.backward()
    h64, w64 = hidden[0].double().requires_grad_(), weight.double().requires_grad_()
    ref = naive_loss(h64, w64, targets[0])
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_all_ignored_head_contributes_zero(request, backend):
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    hidden, weight, targets = make_inputs(2, 6, 8, 50)
    targets[1] = IGNORE
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, per_head = fused_linear_cross_entropy(h, w, targets, return_per_head=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert per_head[1].item() == 0.0
    assert torch.all(h.grad[1] == 0)
    only_head0 = fused_linear_cross_entropy(hidden[:1], weight, targets[:1])
    torch.testing.assert_close(loss.detach(), only_head0, rtol=1e-6, atol=1e-6)


def test_everything_ignored_gives_zero_not_nan():
    hidden, weight, targets = make_inputs(2, 4, 8, 30)
    targets[:] = IGNORE
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, targets)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(h.grad == 0)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_very_large_logits(request, backend):
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    hidden, weight, targets = make_inputs(2, 5, 8, 64, ignore_frac=0.0)
    hidden = hidden / hidden.norm(dim=-1, keepdim=True) * 1e4 ** 0.5
    weight = weight / weight.norm(dim=-1, keepdim=True) * 1e4 ** 0.5  # |logits| up to 1e4
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, targets, reduction="none")
    loss.sum().backward()
    h64 = hidden.double().requires_grad_()
    ref = naive_loss(h64, weight.double(), targets, reduction="none")
    ref.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(h.grad).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=5e-2)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("V", [201, 301], ids=["one_pass", "streamed"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_an_fp16_logit_past_the_range_without_smoothing(request, backend, V):
    """A logit below fp16's range is -inf in the fp16 logits: its exp is 0 and the loss finite, on
    every path; the label-smoothing term (eps * sum of scores) is left out at eps 0 (0 * -inf was
    NaN on the streamed Triton path)."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    g = torch.Generator().manual_seed(0)
    hidden = torch.rand(1, 6, 16, generator=g) + 0.5
    weight = torch.randn(V, 16, generator=g) / 4
    weight[3] = -8000.0                                   # logit ~ -1e5: -inf in fp16
    targets = torch.randint(4, V, (1, 6), generator=g)
    loss = fused_linear_cross_entropy(hidden.half(), weight.half(), targets)
    want = F.cross_entropy(hidden.half().double()[0] @ weight.half().double().T, targets[0])
    assert torch.isfinite(loss) and float(loss) == pytest.approx(float(want), rel=1e-3)


def test_non_contiguous_inputs():
    hidden, weight, targets = make_inputs(3, 11, 10, 97)
    h_nc = hidden.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # (n, N, D) with odd strides
    w_big = torch.randn(97, 20, dtype=torch.float32)
    w_big[:, ::2] = weight
    w_nc = w_big[:, ::2].requires_grad_()
    t_nc = targets.t().contiguous().t()
    assert not h_nc.is_contiguous() and not w_nc.is_contiguous() and not t_nc.is_contiguous()
    loss = fused_linear_cross_entropy(h_nc, w_nc, t_nc)
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = naive_loss(h64, w64, targets)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_nc.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_nc.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_eval_mode_matches_training_value():
    hidden, weight, targets = make_inputs(4, 9, 12, 77)
    with torch.no_grad():
        a = fused_linear_cross_entropy(hidden.requires_grad_(), weight, targets, label_smoothing=0.1)
    b = fused_linear_cross_entropy(hidden, weight, targets, label_smoothing=0.1)
    torch.testing.assert_close(a, b.detach())


class AllocationRecorder(TorchDispatchMode):
    """Records the element count of every floating tensor any op produces.

    (The Triton interpreter moves raw storage around as uint8 byte tensors; those are not
    values of the algorithm, so integer tensors are left out.)"""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_tensor_of_N_times_V_elements(request, backend, reduction):
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    n, N, D, V = (4, 64, 16, 500) if backend == "cpu" else (2, 12, 8, 96)
    hidden, weight, targets = make_inputs(n, N, D, V)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    rec = AllocationRecorder()
    with rec:
        loss = fused_linear_cross_entropy(h, w, targets, reduction=reduction, max_scratch_bytes=4 * V * 4)
        loss.sum().backward()
    assert rec.largest < N * V, f"a tensor of {rec.largest} elements appeared (N*V = {N * V})"
    assert rec.largest >= V * D  # sanity: the recorder saw the weight gradient


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradients_bit_identical_across_runs(request, backend):
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    hidden, weight, targets = make_inputs(2, 7, 8, 45)
    grads = []
    for _ in range(2):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        fused_linear_cross_entropy(h, w, targets, z_loss=1e-3, max_scratch_bytes=3 * 45 * 4).backward()
        grads.append((h.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_triton_chunk_kernel_equals_reference_fp16(triton_backend):
    from mtp_kernels.fused_linear_ce import ce_chunk as triton_chunk
    from mtp_kernels.linear_ce_driver import CEOptions

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(6, 150, generator=g) * 4).half()
    targets = torch.tensor([0, 149, IGNORE, 7, 77, 3])
    scale = torch.rand(6, generator=g)
    opts = CEOptions(IGNORE, 0.1, 1e-3, 8.0)
    outs = []
    for fn in (triton_chunk, reference.ce_chunk):
        lg, loss = logits.clone(), torch.empty(6)
        fn(lg, targets, scale, loss, opts, True)
        outs.append((lg.float(), loss))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("case,match", [
    ("shape", "targets must have shape"),
    ("dim", "weight has D="),
    ("range", "token id 500"),
    ("float_targets", "integer tensor"),
    ("bool_targets", "integer tensor"),
    ("no_features", r"have no features \(D=0\)"),
    ("device", "one device"),
    ("dtype", "share one floating dtype"),
    ("head_weights", "head_weights has 3"),
    ("reduction", "reduction must be"),
    ("accum_dtype", "accum_dtype must be"),
])
def test_bad_input_errors(case, match):
    hidden, weight, targets = make_inputs(2, 4, 8, 30)
    kwargs = {}
    if case == "shape":
        targets = targets[:, :3]
    elif case == "dim":
        weight = weight[:, :7]
    elif case == "range":
        targets[1, 2] = 500
    elif case == "float_targets":
        targets = targets.float()
    elif case == "bool_targets":
        targets = targets > 0
    elif case == "no_features":
        hidden, weight = hidden[..., :0], weight[:, :0]
    elif case == "device":
        weight = weight.to("meta")
    elif case == "dtype":
        weight = weight.double()
    elif case == "head_weights":
        kwargs["head_weights"] = [1, 2, 3]
    elif case == "reduction":
        kwargs["reduction"] = "avg"
    elif case == "accum_dtype":
        kwargs["accum_dtype"] = torch.float16  # narrower than the float32 weight
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(hidden, weight, targets, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_gradient_sums_chunks_in_float32(dtype):
    """16 row chunks: summing dW in the weight's dtype rounds the running sum 15 times; the float32
    accumulator must stay as close to float64 as a single chunk (one GEMM, one rounding) does."""
    n, N, D, V = 2, 512, 32, 256
    hidden, weight, targets = make_inputs(n, N, D, V, dtype=dtype, ignore_frac=0.0)
    h64, w64 = hidden.double(), weight.double().requires_grad_()
    naive_loss(h64, w64, targets).backward()
    errors = {}
    for name, accum, rows in [("fp32", torch.float32, 64), ("native", None, 64), ("one_chunk", None, n * N)]:
        w = weight.clone().requires_grad_()
        fused_linear_cross_entropy(hidden, w, targets, accum_dtype=accum,
                                   max_scratch_bytes=rows * V * weight.element_size()).backward()
        assert w.grad.dtype == dtype
        errors[name] = ((w.grad.double() - w64.grad).norm() / w64.grad.norm()).item()
    assert errors["fp32"] <= 1.25 * errors["one_chunk"], errors
    assert errors["native"] > 2.0 * errors["fp32"], errors


def test_float32_accumulator_grows_the_scratch_to_the_size_of_dw(monkeypatch):
    """With a float32 dW accumulator for 16-bit weights, the chunk may hold up to V x D logits (the
    bytes dW's final cast allocates once the scratch is gone): fewer accumulator passes, same peak.
    Without the accumulator the budget is the caller's."""
    from mtp_kernels import linear_ce_driver

    seen = []
    rows_per_chunk = linear_ce_driver.rows_per_chunk
    monkeypatch.setattr(linear_ce_driver, "rows_per_chunk", lambda *a: seen.append(rows_per_chunk(*a)) or seen[-1])
    n, N, D, V = 2, 64, 32, 100
    hidden, weight, targets = make_inputs(n, N, D, V, dtype=torch.bfloat16, ignore_frac=0.0)
    h64, w64 = hidden.double(), weight.double().requires_grad_()
    naive_loss(h64, w64, targets).backward()
    for accum, want_rows in [(torch.float32, D), (None, 4)]:
        seen.clear()
        w = weight.clone().requires_grad_()
        fused_linear_cross_entropy(hidden, w, targets, accum_dtype=accum, max_scratch_bytes=4 * V * 2).backward()
        assert seen == [want_rows], (accum, seen)
        assert ((w.grad.double() - w64.grad).norm() / w64.grad.norm()).item() < 1e-2
    # float32 master weights under autocast sum dW in float32 and are never cast: no cast to make room
    # for, so the caller's budget holds.
    seen.clear()
    w32 = weight.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_linear_cross_entropy(hidden.float(), w32, targets, max_scratch_bytes=4 * V * 2).backward()
    assert seen == [4] and w32.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_float64_inputs_run_in_float64_throughout(request, backend):
    """accum_dtype=float32 (the default) means "at least float32": float64 inputs sum dW in float64 across
    chunks, and the loss, per-head losses and softmax math are float64 too (the Triton chunk computes in
    float32, so they take its twin), to the oracle's last bits."""
    from mtp_kernels.linear_ce_driver import to_compute_dtype

    if backend == "triton":
        request.getfixturevalue("triton_backend")
    n, N, D, V = 2, 64, 16, 37
    hidden, weight, targets = make_inputs(n, N, D, V, dtype=torch.float64, ignore_frac=0.1)
    assert to_compute_dtype(hidden, weight, torch.float32)[2] is None  # no separate (float32) accumulator
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0}
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = naive_loss(h_ref, w_ref, targets, **opts)
    ref.backward()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, per_head = fused_linear_cross_entropy(h, w, targets, max_scratch_bytes=8 * V * 8,  # 16 chunks
                                                return_per_head=True, **opts)
    loss.backward()
    assert loss.dtype == per_head.dtype == w.grad.dtype == h.grad.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-10, atol=1e-12)
    # reduction "none" recomputes its gradients in the backward, so autograd's own check applies.
    small = [t[:, :5].clone() for t in (hidden, targets)]
    torch.autograd.gradcheck(
        lambda hh, ww: fused_linear_cross_entropy(hh, ww, small[1], reduction="none", max_scratch_bytes=3 * V * 8,
                                                  **opts),
        (small[0].requires_grad_(), weight[:, :].clone().requires_grad_()))


def test_add_matmul_sums_16bit_products_in_float32():
    from mtp_kernels.linear_ce_driver import add_matmul

    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 5, generator=g).bfloat16()
    b = torch.randn(5, 11, generator=g).bfloat16()
    acc = torch.full((37, 11), 1000.0)
    add_matmul(acc, a, b)  # the CPU takes the slab path (odd row count: 4 slabs of 10, 10, 10, 7)
    exact = 1000.0 + a.double() @ b.double()
    # float32 near 1000 is exact to 6e-5; a bf16 sum would be off by up to 4
    assert (acc.double() - exact).abs().max() < 2e-4


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.bfloat16])
def test_add_matmul_overwrite_never_reads_the_old_values(acc_dtype):
    """The first chunk of the dW sum writes an uninitialized accumulator: NaN there must not leak."""
    from mtp_kernels.linear_ce_driver import add_matmul

    g = torch.Generator().manual_seed(1)
    a = torch.randn(37, 5, generator=g).bfloat16()
    b = torch.randn(5, 11, generator=g).bfloat16()
    acc = torch.full((37, 11), float("nan"), dtype=acc_dtype)
    add_matmul(acc, a, b, overwrite=True)
    torch.testing.assert_close(acc.double(), a.double() @ b.double(), rtol=1e-2 if acc_dtype == torch.bfloat16 else 1e-6,
                               atol=1e-2 if acc_dtype == torch.bfloat16 else 1e-5)


class GemmDtypes(TorchDispatchMode):
    """Records the dtypes of every matrix multiply's operands."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.seen.add(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend,dtype", [("cpu", torch.bfloat16), ("triton", torch.float16)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_runs_the_gemms_in_its_dtype_and_returns_float32_gradients(request, backend, dtype, reduction):
    """float32 master weights under torch.autocast: the matmuls run in the autocast dtype (as a
    Linear's would), gradients come back in float32, and dW sums in float32 (its own dtype)."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    n, N, D, V = (2, 96, 16, 203) if backend == "cpu" else (2, 12, 8, 45)
    hidden, weight, targets = make_inputs(n, N, D, V)
    rows_per_chunk = 16
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    gemms = GemmDtypes()
    with torch.autocast("cpu", dtype=dtype), gemms:
        loss = fused_linear_cross_entropy(h, w, targets, reduction=reduction, max_scratch_bytes=rows_per_chunk * V * 2)
    loss.sum().backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32
    assert gemms.seen == {(dtype, dtype)}, gemms.seen  # logits and dH (dW's CPU sum multiplies float32 copies)
    # The same as casting the inputs by hand, with dW kept in float32 rather than rounded to `dtype`.
    h16, w16 = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    by_hand = fused_linear_cross_entropy(h16, w16, targets, reduction=reduction, max_scratch_bytes=rows_per_chunk * V * 2)
    by_hand.sum().backward()
    assert torch.equal(loss, by_hand)
    assert torch.equal(h.grad, h16.grad.float())
    w64 = w16.detach().double().requires_grad_()
    naive_loss(h16.detach().double(), w64, targets, reduction=reduction).sum().backward()
    err = lambda g: ((g.double() - w64.grad).norm() / w64.grad.norm()).item()  # noqa: E731
    assert err(w.grad) < err(w16.grad)


def test_mixed_dtypes_need_autocast():
    hidden, weight, targets = make_inputs(2, 6, 8, 30)
    with pytest.raises(ValueError, match="share one floating dtype .*torch.autocast"):
        fused_linear_cross_entropy(hidden.bfloat16(), weight, targets)
    h = hidden.bfloat16().requires_grad_()
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_linear_cross_entropy(h, w, targets).backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}, {"reduction": "none"}])
def test_gpu_matches_fp64_oracle(dtype, opts):
    n, N, D, V = 4, 1000, 512, 32001
    hidden, weight, targets = make_inputs(n, N, D, V, dtype=torch.float32, scale=2.0)
    hidden, weight, targets = hidden.cuda().to(dtype), weight.cuda().to(dtype), targets.cuda()
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fused_linear_cross_entropy(h, w, targets, max_scratch_bytes=64 * 1024 * 1024, **opts)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = naive_loss(h64, w64, targets, **opts)
    g = torch.rand(ref.shape, device="cuda", dtype=torch.float64)
    out.backward(g.to(out.dtype))
    ref.backward(g)
    # float32 runs tf32 GEMMs (10 mantissa bits, unit roundoff 4.9e-4): the loss's relative error
    # read 1.2e-3 in one of two H100 runs (cuBLAS may pick another tf32 algorithm per run)
    tol = {torch.float32: 3e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out, ref) < tol
    assert rel(h.grad, h64.grad) < tol
    assert rel(w.grad, w64.grad) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("accum_dtype", [torch.float32, None])
def test_gpu_bit_identical_gradients_and_bounded_memory(accum_dtype):
    n, N, D, V = 4, 2048, 1024, 32000
    hidden, weight, targets = make_inputs(n, N, D, V, dtype=torch.float32)
    hidden, weight, targets = hidden.cuda().bfloat16(), weight.cuda().bfloat16(), targets.cuda()
    grads = []
    for _ in range(2):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fused_linear_cross_entropy(h, w, targets, accum_dtype=accum_dtype).backward()
        peak = torch.cuda.max_memory_allocated() - base
        grads.append((h.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    grad_bytes = hidden.numel() * 2 + weight.numel() * 2
    accumulator = weight.numel() * 4 if accum_dtype is not None else 0
    assert peak <= grad_bytes + accumulator + 256 * 2 ** 20 + 16 * 2 ** 20, f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.gpu
def test_gpu_autocast_float32_weights_train_in_bf16():
    """The usual mixed-precision setup: float32 master weights under torch.autocast. The GEMMs run in
    bf16 (as a Linear's would), gradients come back float32, close to the float64 oracle."""
    n, N, D, V = 4, 1000, 512, 32001
    hidden, weight, targets = make_inputs(n, N, D, V, dtype=torch.float32)
    h, w, t = hidden.cuda().requires_grad_(), weight.cuda().requires_grad_(), targets.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, t, max_scratch_bytes=32 * 1024 * 1024)
    loss.backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32
    h64, w64 = hidden.double().cuda().requires_grad_(), weight.double().cuda().requires_grad_()
    naive_loss(h64, w64, t).backward()
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(loss, naive_loss(h64.detach(), w64.detach(), t)) < 2e-2
    assert rel(h.grad, h64.grad) < 2e-2 and rel(w.grad, w64.grad) < 2e-2


@pytest.mark.gpu
def test_gpu_add_matmul_rounds_once():
    """On CUDA the float32 accumulator takes cuBLAS's float32 result directly (torch's out_dtype
    GEMM); where torch lacks it, the generic path must still be within one bf16 rounding per product."""
    from mtp_kernels.linear_ce_driver import _fp32_out_gemm_works, add_matmul

    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(4096, 512, device="cuda", generator=g).bfloat16()
    b = torch.randn(512, 1024, device="cuda", generator=g).bfloat16()
    acc = torch.full((4096, 1024), float("nan"), device="cuda")
    for i in range(8):
        add_matmul(acc, a, b, overwrite=i == 0)   # the first overwrites the NaN fill
    exact = 8 * (a.double() @ b.double())
    rel = ((acc.double() - exact).norm() / exact.norm()).item()
    bound = 1e-5 if _fp32_out_gemm_works(acc.device, torch.bfloat16, torch.float32) else 4e-3
    assert rel < bound, (rel, bound)


def test_second_backward_is_a_clear_error_not_a_wrong_gradient():
    hidden, weight, targets = make_inputs(2, 5, 8, 40)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, targets)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    assert torch.equal(h.grad, first)



@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_is_a_clear_error(reduction):
    hidden, weight, targets = make_inputs(2, 5, 8, 40)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, targets, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) is not supported"):
        torch.autograd.grad(loss, h, create_graph=True)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint16, torch.int32])
def test_any_integer_dtype_holds_targets(dtype):
    """uint16 is the corpus's own token stream dtype (data.py); int8 holds a small vocabulary."""
    hidden, weight, targets = make_inputs(2, 7, 8, 100, ignore_frac=0.0)
    ref = fused_linear_cross_entropy(hidden, weight, targets)
    assert torch.equal(fused_linear_cross_entropy(hidden, weight, targets.to(dtype)), ref)


def test_head_weights_and_options_may_be_numpy_numbers():
    import numpy as np

    hidden, weight, targets = make_inputs(2, 7, 8, 100)
    assert torch.equal(fused_linear_cross_entropy(hidden, weight, targets, head_weights=np.array([1.0, 0.25])),
                       fused_linear_cross_entropy(hidden, weight, targets, head_weights=[1.0, 0.25]))
    assert torch.equal(fused_linear_cross_entropy(hidden, weight, targets, ignore_index=np.int64(IGNORE),
                                                  label_smoothing=np.float32(0.25), z_loss=np.float16(0.5)),
                       fused_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE, label_smoothing=0.25,
                                                  z_loss=0.5))


@pytest.mark.parametrize("dtype,scale", [(torch.float16, 65536.0), (torch.bfloat16, 1 / 3)])
def test_a_loss_scale_multiplies_the_gradients_in_float32(dtype, scale):
    """The mean/sum gradients are made in the forward and scaled by grad_output in the backward: a
    GradScaler's 65536 is inf in fp16, and 1/3 (accumulating 3 micro-batches) rounds in bf16 to
    0.3340, a 0.2% bias; the product is formed in float32 and rounded once."""
    hidden, weight, targets = make_inputs(2, 37, 16, 101, dtype=dtype)
    grads = []
    for factor in (1.0, scale):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        (fused_linear_cross_entropy(h, w, targets) * factor).backward()
        assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
        grads.append((h.grad.double(), w.grad.double()))
    for unit, scaled in zip(*grads):
        ratio = float((scaled * unit).sum() / (unit * unit).sum())    # least-squares scale of the two
        assert ratio == pytest.approx(scale, rel=2e-4), ratio


def test_float64_head_weights_stay_float64():
    hidden, weight, targets = make_inputs(2, 9, 8, 37, dtype=torch.float64)
    weights = [0.1, 0.7]
    got = fused_linear_cross_entropy(hidden, weight, targets, head_weights=weights)
    want = naive_loss(hidden, weight, targets, head_weights=weights)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_scratch_bytes="x"), "max_scratch_bytes must be None or a positive int"),
    (dict(max_scratch_bytes=0), "max_scratch_bytes must be None or a positive int"),
    (dict(ignore_index="x"), "ignore_index must be an int"),
    (dict(head_weights=torch.ones(2, requires_grad=True)), r"constant loss factors and get no gradient"),
    (dict(head_weights=[float("nan")]), "head_weights must be a sequence of finite numbers"),
    (dict(z_loss=float("nan")), "z_loss must be a finite number"),
    (dict(softcap=float("inf")), "softcap must be None or a finite number"),
])
def test_option_types_and_non_finite_values_are_clear_errors(kwargs, match):
    hidden, weight = torch.randn(1, 4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(hidden, weight, torch.zeros(1, 4, dtype=torch.long), **kwargs)

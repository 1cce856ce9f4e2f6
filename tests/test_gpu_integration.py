"""The model on CUDA: Triton kernels (attention, RMSNorm) against the reference path, and generation."""
import pytest
import torch

from mtp_engine import generate as generate_module
from mtp_engine.generate import Generator
from mtp_engine.loss import MTPLoss
from mtp_engine.model import ModelArgs, Transformer

pytestmark = pytest.mark.gpu


def small_model(dtype):
    torch.manual_seed(0)
    args = ModelArgs(dim=512, n_layers=6, n_heads=8, n_kv_heads=2, vocab_size=1000, multiple_of=64,
                     n_future_tokens=4, max_seq_len=512)
    return Transformer(args).cuda().to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_model_logits_and_grads_match_reference(monkeypatch, dtype):
    model = small_model(dtype)
    tokens = torch.randint(0, 1000, (2, 300), device="cuda")
    monkeypatch.setenv("MTP_BACKEND", "reference")
    ref = model(tokens, return_all_heads=True)
    # float16 gradients of a mean loss underflow into subnormals (wk's differ ~3% from float64's on
    # the reference path alone), so scale the loss as fp16 training does (GradScaler): 1024 brings
    # the reference path to ~0.1% of float64, and the comparison then measures the kernels.
    scale = 1024.0 if dtype == torch.float16 else 1.0
    loss_ref = MTPLoss(4)(model.head_hidden(tokens), model.output.weight, tokens).loss
    (loss_ref * scale).backward()
    grads_ref = {k: p.grad.float().clone() for k, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.delenv("MTP_BACKEND")
    out = model(tokens, return_all_heads=True)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel
    loss = MTPLoss(4)(model.head_hidden(tokens), model.output.weight, tokens).loss
    (loss * scale).backward()
    assert abs(loss.item() - loss_ref.item()) < 2e-2 * abs(loss_ref.item())
    for k, p in model.named_parameters():
        g, r = p.grad.float(), grads_ref[k]
        assert ((g - r).norm() / r.norm().clamp(min=1e-12)).item() < 5e-2, k


@pytest.mark.parametrize("grouped", [False, True])
def test_triton_generation_batched_equals_single(monkeypatch, grouped):
    """grouped: every prompt prefills in its own forward and cache rows (forward_cached(first_row=...)
    on the GPU kernels' cache views), as a ragged batch of long prompts does."""
    if grouped:
        monkeypatch.setitem(generate_module.PREFILL_FORWARD_TOKENS, "cuda", 0)
    model = small_model(torch.float32)
    gen = Generator(model, max_batch_size=4, max_seq_len=256)
    prompts = [[1, 5, 9, 33], [7], [2, 3, 4, 5, 6, 7, 8, 9, 10]]
    batched = gen.generate(prompts, max_gen_len=20).tokens
    single = [gen.generate([p], max_gen_len=20).tokens[0] for p in prompts]
    assert batched == single
    assert all(len(t) == 20 for t in batched)


def test_seeded_sampling_on_gpu_kernels_ignores_the_batch_and_speculation():
    """float32 model on the compiled kernels: a seeded prompt samples the same tokens alone and in a
    batch, and seeded tree speculation emits plain sampling's tokens (keyed noise, GPU Philox)."""
    model = small_model(torch.float32)
    gen = Generator(model, max_batch_size=4, max_seq_len=256)
    prompts = [[1, 5, 9, 33], [7], [2, 3, 4, 5, 6, 7, 8, 9, 10]]
    kwargs = dict(max_gen_len=24, temperature=0.9, top_p=0.95, seed=[4, 5, 6], eos_id=-1)
    batched = gen.generate(prompts, **kwargs).tokens
    alone = [gen.generate([p], **{**kwargs, "seed": [s]}).tokens[0] for p, s in zip(prompts, [4, 5, 6])]
    assert batched == alone
    assert gen.generate(prompts, speculative="tree", **kwargs).tokens == batched
    # top_p 1: the Gumbel-max kernel with per-row temperatures, which a batch of one repeats for each
    # tree node as a stride-0 view (once read as contiguous, past its one element)
    one = Generator(model, max_batch_size=1, max_seq_len=256)
    kernel_kwargs = {**kwargs, "top_p": 1.0, "seed": [4]}
    plain = one.generate(prompts[:1], **kernel_kwargs).tokens
    for mode in ("tree", "chain"):
        assert one.generate(prompts[:1], speculative=mode, **kernel_kwargs).tokens == plain, mode


@pytest.mark.parametrize("prefill", ["one", "grouped", "chunked"])
@pytest.mark.parametrize("speculative", [None, "tree"])
def test_bf16_generation_on_triton_kv_attention_is_greedy_under_the_reference(monkeypatch, speculative, prefill):
    """bf16 is where the Triton KV-cache kernel runs (float32 goes to the reference). Every token the
    graphed generator picks on the kernels must be an argmax of the reference model's (uncached,
    teacher-forced) logits, up to bf16 noise: a wrong cache slot, mask bit or compaction would pick
    tokens far from it. grouped: each prompt prefills in its own forward and cache rows; chunked: the
    prompts go through in chunks of a few positions, each attending to the cached ones before it."""
    from mtp_kernels.attention import _kernel_supports

    if prefill == "grouped":
        monkeypatch.setitem(generate_module.PREFILL_FORWARD_TOKENS, "cuda", 0)
    if prefill == "chunked":
        monkeypatch.setitem(generate_module.PREFILL_CHUNK_TOKENS, "cuda", 16)

    model = small_model(torch.bfloat16)
    assert _kernel_supports(torch.empty(1, 1, 8, 64, device="cuda", dtype=torch.bfloat16))
    prompts = [[1, 5, 9, 33], [7], list(range(40, 70))]
    got = Generator(model, max_batch_size=4, max_seq_len=256).generate(prompts, max_gen_len=24,
                                                                       speculative=speculative)
    model.clear_caches()  # the check below is an uncached forward
    monkeypatch.setenv("MTP_BACKEND", "reference")
    with torch.no_grad():
        for prompt, tokens in zip(prompts, got.tokens):
            assert len(tokens) == 24
            logits = model(torch.tensor([prompt + tokens], device="cuda"))[0, :, 0].float()
            pred = logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)]          # (24, V)
            chosen = pred.gather(1, torch.tensor(tokens, device="cuda")[:, None])[:, 0]
            gap = pred.max(1).values - chosen
            spread = pred.max(1).values - pred.median(1).values
            assert (gap <= 0.05 * spread).all(), (gap / spread).max().item()

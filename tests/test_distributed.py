"""torch.distributed on CPU: 2 gloo processes spawned by the tests (see _dist_workers.py).

- DDP and FSDP2 training steps give the parameters (and AdamW state) of one process on the
  concatenated batch, and the fused loss's gradient reaches `output.weight`;
- the vocabulary-parallel fused loss and its gradients equal the single-process fused loss;
- tensor-parallel greedy generation equals single-process generation token for token.
Each scenario runs in one spawn (module-scoped fixture) to keep process start-up to a few seconds.
"""

import math

import pytest
import torch
import torch.distributed as dist

import _dist_workers as W
from mtp_engine import distributed as D
from mtp_kernels import fused_linear_cross_entropy, reference
from mtp_kernels.linear_ce_driver import CEOptions

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

ATOL = 1e-5
IGNORE = W.IGNORE


# ------------------------------------------------------------------------------------ single process
def test_single_process_env_without_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    env = D.init_distributed("cpu")
    assert (env.rank, env.world_size, env.local_rank, env.is_main, env.distributed) == (0, 1, 0, True, False)
    assert env.device == torch.device("cpu")
    assert not dist.is_initialized()
    t = torch.tensor([1.5, -2.0])
    reduced = D.all_reduce_mean(t, env)
    assert torch.equal(reduced, t) and reduced is not t
    D.barrier(env)
    D.cleanup(env)


def test_single_process_wrap_and_state_dict_are_plain():
    env = D.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    module = W.train_model(W.tiny_model())
    for strategy in D.STRATEGIES:
        assert D.wrap_for_training(module, strategy, env) is module
        with D.gathered_parameters(module, strategy, env):  # nothing to gather in one process
            pass
        state = D.full_state_dict(module, strategy, env)
        assert list(state) == list(module.model.state_dict())  # Meta's key names, no "model." prefix
        assert all(not t.requires_grad and t.device.type == "cpu" for t in state.values())
    optimizer = W.make_optimizer(module.parameters())
    module(W.train_batch(batch=2)).loss.backward()
    optimizer.step()
    saved = D.full_optimizer_state(module, optimizer, "none", env)
    assert "model.output.weight" in saved["state"]
    fresh = W.make_optimizer(module.parameters())
    D.load_optimizer_state(module, fresh, saved, "none", env)
    torch.testing.assert_close(fresh.state_dict()["state"], optimizer.state_dict()["state"], rtol=0, atol=0)
    # What a one-process run saves (optimizer.state_dict(), keyed by index) loads the same.
    from_index = W.make_optimizer(module.parameters())
    D.load_optimizer_state(module, from_index, optimizer.state_dict(), "none", env)
    torch.testing.assert_close(from_index.state_dict()["state"], optimizer.state_dict()["state"], rtol=0, atol=0)
    other = W.train_model(W.tiny_model(n_layers=3))
    with pytest.raises(ValueError, match="not the same model"):
        D.load_optimizer_state(other, W.make_optimizer(other.parameters()), optimizer.state_dict(), "none", env)


@pytest.mark.parametrize("env_vars, match", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK 2 is outside \[0, WORLD_SIZE=2\)"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set"),
])
def test_init_distributed_bad_environment(monkeypatch, env_vars, match):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env_vars.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        D.init_distributed("cpu")


def test_bad_strategy_and_device():
    env = D.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    with pytest.raises(ValueError, match="strategy must be one of"):
        D.wrap_for_training(W.train_model(W.tiny_model()), "zero3", env)
    with pytest.raises(ValueError, match="holds no mtp_engine Transformer"):
        D.wrap_for_training(torch.nn.Linear(2, 2), "ddp", env)
    two = D.DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), is_main=True)
    with pytest.raises(ValueError, match="independent replicas"):
        D.wrap_for_training(W.train_model(W.tiny_model()), "none", two)
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        D.init_distributed("meta")


# ------------------------------------------------------------------------------------ DDP / FSDP2
@pytest.fixture(scope="module")
def train_results(tmp_path_factory):
    ranks = W.run_on_ranks("train", tmp_path_factory.mktemp("train"), strategies=("ddp", "fsdp"))
    return ranks


@pytest.fixture(scope="module")
def single_process_training():
    """The same steps in one process on the whole (concatenated) batch."""
    module = W.train_model(W.tiny_model(seed=0))
    optimizer = W.make_optimizer(module.parameters())
    output_grads, losses = [], []
    for step in range(W.TRAIN_STEPS):
        out = module(W.train_batch(seed=1 + step))
        out.loss.backward()
        output_grads.append(module.model.output.weight.grad.clone())
        losses.append(out.loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    names = {p: n for n, p in module.named_parameters()}
    optim_state = {names[p]: s for p, s in optimizer.state.items()}
    return dict(state=module.model.state_dict(), optim_state=optim_state, output_grads=output_grads, losses=losses)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_data_parallel_step_equals_single_process(train_results, single_process_training, strategy):
    ref = single_process_training
    rank0, rank1 = train_results[0][strategy], train_results[1][strategy]
    assert rank1["state"] is None and rank1["optim_state"] is None  # rank 0 alone holds the full copies
    state = rank0["state"]
    assert list(state) == list(ref["state"])  # Meta's names, in the model's order
    start = W.tiny_model(seed=0).state_dict()
    for key, expected in ref["state"].items():
        assert state[key].device.type == "cpu" and state[key].dtype == torch.float32
        torch.testing.assert_close(state[key], expected, rtol=0, atol=ATOL, msg=lambda m: f"{strategy} {key}: {m}")
    # The weights moved (a step that changed nothing would pass the comparison above trivially).
    assert not torch.allclose(state["output.weight"], start["output.weight"], atol=1e-4)
    # Each rank's loss is the mean of its half; their average is the concatenated batch's mean.
    for step in range(W.TRAIN_STEPS):
        mean_loss = (rank0["losses"][step] + rank1["losses"][step]) / 2
        torch.testing.assert_close(mean_loss, ref["losses"][step], rtol=0, atol=ATOL)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_direct_model_calls_inside_gathered_parameters(train_results, single_process_training, strategy):
    model = W.tiny_model()
    model.load_state_dict(single_process_training["state"])
    with torch.no_grad():
        expected = model.head_hidden(W.train_batch(batch=2, seed=9))[0] @ model.output.weight.t()
    for rank in (0, 1):
        torch.testing.assert_close(train_results[rank][strategy]["eval_logits"], expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gradient_reaches_output_weight(train_results, single_process_training, strategy):
    for rank in (0, 1):
        for step, expected in enumerate(single_process_training["output_grads"]):
            grad = train_results[rank][strategy]["output_grads"][step]
            assert grad.abs().sum() > 0
            torch.testing.assert_close(grad, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_full_optimizer_state_equals_single_process_and_reloads(train_results, single_process_training, strategy):
    saved = train_results[0][strategy]["optim_state"]
    ref = single_process_training["optim_state"]
    assert set(saved["state"]) == set(ref)
    for name, expected in ref.items():
        for field in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(saved["state"][name][field], expected[field], rtol=0, atol=ATOL,
                                       msg=lambda m: f"{strategy} {name}.{field}: {m}")
        assert float(saved["state"][name]["step"]) == W.TRAIN_STEPS
    for reloaded in (train_results[0][strategy]["reloaded"], train_results[0][strategy]["reloaded_from_index"]):
        for name in ref:
            for field in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(reloaded["state"][name][field], saved["state"][name][field], rtol=0,
                                           atol=0)


# ------------------------------------------------------------------------------------ vocabulary-parallel loss
@pytest.fixture(scope="module")
def vp_results(tmp_path_factory):
    return W.run_on_ranks("vocab_parallel", tmp_path_factory.mktemp("vp"), cases=tuple(W.VP_CASES))


def _single_process_vp(case):
    hidden, weight, targets = W.vp_inputs(case["n"], case["N"], case["D"], case["V"],
                                          ignore_frac=case.get("ignore_frac", 0.25))
    if case.get("single"):
        hidden, targets = hidden[0], targets[0]
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with W.vp_autocast(case):
        loss, per_head = fused_linear_cross_entropy(h, w, targets, return_per_head=True, **case["opts"])
    loss.backward(W.vp_grad_out(case, loss.shape))
    return loss.detach(), per_head, h.grad, w.grad


@pytest.mark.parametrize("name", list(W.VP_CASES))
def test_vocab_parallel_matches_single_process(vp_results, name):
    case = W.VP_CASES[name]
    loss, per_head, hidden_grad, weight_grad = _single_process_vp(case)
    rtol = case.get("rtol", 1e-5)
    scaled_atol = lambda ref: ATOL if "rtol" not in case else rtol * float(ref.abs().max())  # noqa: E731
    for rank in (0, 1):
        got = vp_results[rank][name]
        torch.testing.assert_close(got["loss"], loss, rtol=rtol, atol=ATOL)
        torch.testing.assert_close(got["eval_loss"], loss, rtol=rtol, atol=ATOL)
        torch.testing.assert_close(got["per_head"], per_head, rtol=rtol, atol=ATOL)
        torch.testing.assert_close(got["hidden_grad"], hidden_grad, rtol=rtol, atol=scaled_atol(hidden_grad))
        lo, hi = W.vp_shard_bounds(case["split"], rank)
        assert got["weight_grad"].shape == (hi - lo, case["D"])
        assert got["weight_grad"].dtype == got["hidden_grad"].dtype == torch.float32
        torch.testing.assert_close(got["weight_grad"], weight_grad[lo:hi], rtol=rtol, atol=scaled_atol(weight_grad))
    if case.get("ignore_frac") == 1.0:
        assert float(loss) == 0.0 and hidden_grad.abs().sum() == 0
    else:
        assert hidden_grad.abs().sum() > 0 and weight_grad.abs().sum() > 0


def test_vocab_parallel_bad_input_raises_on_every_rank(tmp_path):
    ranks = W.run_on_ranks("vocab_parallel_errors", tmp_path)
    for messages in ranks:
        assert "token id 101" in messages["token_out_of_range"] and "[0, 101)" in messages["token_out_of_range"]
        assert "same rows and D on every rank" in messages["rows_differ"]
        assert "at least one vocabulary row" in messages["empty_shard"]
        assert "every rank must compute in one dtype (autocast included), got ['float32', 'bfloat16']" \
            in messages["dtypes_differ"]
        assert "every rank must compute in one dtype (autocast included), got ['float32', 'bfloat16']" \
            in messages["autocast_one_rank"]
        assert messages["both_bf16_compute"] > 0    # bf16 tensors beside fp32 under bf16 autocast: one dtype
        assert "same max_scratch_bytes" in messages["scratch_differs"]
        assert "token id 1000000 (on rank 1) outside [0, 101)" in messages["targets_bad_one_rank"]
        assert "same gradients" in messages["grads_differ"]
        assert messages["ok_loss"] > 0
        assert math.isfinite(messages["neg_inf_loss"])
        assert messages["neg_inf_loss"] == pytest.approx(messages["neg_inf_single"], rel=1e-3)
    for name, problem in (("one_rank_dtype", "dtype"), ("one_rank_width", "D"), ("one_rank_head_weights", "heads"),
                          ("one_rank_not_tensors", "must be tensors")):
        assert "rank(s) [1] of the group refused their inputs" in ranks[0][name]
        assert problem in ranks[1][name] and "refused their inputs" not in ranks[1][name]
    assert ranks[0]["ok_loss"] == ranks[1]["ok_loss"]


def test_vocab_parallel_needs_a_group():
    from mtp_kernels.vocab_parallel_ce import vocab_parallel_cross_entropy

    hidden, weight, targets = W.vp_inputs(1, 3, 4, 9)
    with pytest.raises(ValueError, match="needs a process_group"):
        vocab_parallel_cross_entropy(hidden, weight, targets, process_group=None)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="not initialized"):
            fused_linear_cross_entropy(hidden, weight, targets, process_group=object())


# The two Triton kernels against their reference twins, in one process (no collectives needed).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("opts", [CEOptions(), CEOptions(label_smoothing=0.1, z_loss=1e-2, softcap=3.0)],
                         ids=["plain", "all_options"])
def test_vp_triton_kernels_equal_reference(triton_backend, dtype, opts):
    from mtp_kernels import vocab_parallel_ce as vp

    g = torch.Generator().manual_seed(3)
    R, V_local, vocab_start, vocab_size = 7, 83, 120, 250
    logits = (torch.randn(R, V_local, generator=g) * 3).to(dtype)
    # Targets inside this shard, in the other one (below and above), and ignored.
    targets = torch.tensor([120, 150, 202, 5, 119, IGNORE, 230], dtype=torch.int64)
    stats, ref_stats = torch.empty(3, R), torch.empty(3, R)
    vp.vp_chunk_stats(logits, targets, vocab_start, stats, opts)
    reference.vp_chunk_stats(logits, targets, vocab_start, ref_stats, opts)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(stats, ref_stats, rtol=tol, atol=tol)
    assert stats[2, 3] == stats[2, 4] == stats[2, 6] == 0 and stats[:, 5].abs().sum() == 0  # not owned / ignored

    lse = ref_stats[0] + torch.rand(R, generator=g)  # a global lse >= the local one
    scale = torch.rand(R, generator=g) + 0.5
    grad, ref_grad = logits.clone(), logits.clone()
    vp.vp_chunk_grad(grad, targets, vocab_start, vocab_size, lse, scale, opts)
    reference.vp_chunk_grad(ref_grad, targets, vocab_start, vocab_size, lse, scale, opts)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol, atol=tol)
    assert grad[5].abs().sum() == 0


def test_vp_chunks_follow_the_single_process_scratch_rule(monkeypatch):
    """The vocabulary-parallel loop sizes its chunks as the single-process one does: with a float32
    dW accumulator for 16-bit weights the chunk may grow to dW's size (from the largest shard, so
    every rank runs as many chunks). A backward pass of reduction "none" needs no collective."""
    from mtp_kernels import vocab_parallel_ce as vp

    seen = []
    rows_per_chunk = vp.rows_per_chunk
    monkeypatch.setattr(vp, "rows_per_chunk", lambda *a: seen.append(rows_per_chunk(*a)) or seen[-1])
    g = torch.Generator().manual_seed(5)
    M, D, V_local = 64, 16, 40
    rows = torch.randn(M, D, generator=g).bfloat16()
    weight = torch.randn(V_local, D, generator=g).bfloat16()
    targets = torch.randint(0, 2 * V_local, (M,), generator=g)
    shard = vp._Shard(None, vocab_start=0, vocab_size=2 * V_local, max_local=V_local)
    kernels = (reference.vp_chunk_stats, reference.vp_chunk_grad)
    lse = torch.full((M,), 5.0)
    for accum, want_rows in [(torch.float32, D), (None, 4)]:
        seen.clear()
        opts = CEOptions(accum_dtype=accum, dw_cast=accum is not None)
        *_, d_weight = vp.vp_linear_ce_chunks(rows, weight, targets, torch.ones(M), opts,
                                              shard, kernels, lse=lse, grad_rows=False, grad_weight=True,
                                              max_scratch_bytes=4 * V_local * 2)
        assert seen == [want_rows], (accum, seen)
        assert d_weight.dtype == (accum or torch.bfloat16)


def test_vp_reference_kernels_reassemble_the_full_row():
    """Two shards' stats combined by log-sum-exp give the full row's lse and loss terms."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 30, generator=g)
    targets = torch.tensor([0, 12, 29, 13, IGNORE])
    opts = CEOptions(softcap=2.0)
    parts = []
    for lo, hi in ((0, 13), (13, 30)):
        stats = torch.empty(3, 5)
        reference.vp_chunk_stats(logits[:, lo:hi].contiguous(), targets, lo, stats, opts)
        parts.append(stats)
    lse = torch.logsumexp(torch.stack([parts[0][0], parts[1][0]]), dim=0)
    s = 2.0 * torch.tanh(logits / 2.0)
    valid = targets != IGNORE
    torch.testing.assert_close(lse[valid], torch.logsumexp(s, 1)[valid])
    torch.testing.assert_close((parts[0][2] + parts[1][2])[valid], s[valid, targets[valid]])
    torch.testing.assert_close((parts[0][1] + parts[1][1])[valid], s.sum(1)[valid])


# ------------------------------------------------------------------------------------ tensor parallel
TP_PROMPTS = [[1, 5, 9, 13, 2], [7, 3], [60, 61, 62, 63, 64, 65, 1, 2, 3]]
TP_GEN_LEN = 12
# Even vocabulary and FFN size: save_checkpoint splits them over 2 shards.
TP_ARGS = dict(vocab_size=66, n_future_tokens=3, n_layers=5)


def _speculative_modes():
    """Greedy plain decoding, plus self-speculative "chain" where generate.py implements it."""
    from mtp_engine.generate import Generator

    gen = Generator(W.tiny_model(**TP_ARGS).eval(), max_batch_size=1, max_seq_len=16)
    try:
        gen.generate([[1, 2]], max_gen_len=2, temperature=0.0, speculative="chain")
    except NotImplementedError:
        return (None,)
    return (None, "chain")


@pytest.fixture(scope="module")
def tp_checkpoints(tmp_path_factory):
    from mtp_engine.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("tp")
    model = W.tiny_model(seed=5, **TP_ARGS)
    save_checkpoint(model, root / "two_shards", shards=2)
    save_checkpoint(model, root / "one_shard", shards=1)
    return root


@pytest.fixture(scope="module")
def tp_reference(tp_checkpoints):
    from mtp_engine.checkpoint import load_checkpoint
    from mtp_engine.generate import Generator

    model = load_checkpoint(tp_checkpoints / "one_shard").eval()
    gen = Generator(model, max_batch_size=len(TP_PROMPTS), max_seq_len=64)
    modes = _speculative_modes()
    tokens = {mode or "plain": gen.generate(TP_PROMPTS, max_gen_len=TP_GEN_LEN, temperature=0.0,
                                            speculative=mode).tokens for mode in modes}
    one_row = Generator(model, max_batch_size=1, max_seq_len=64, share_prefixes=False)
    tokens["shared prefix"] = one_row.generate([TP_PROMPTS[0], TP_PROMPTS[0] + [7]], max_gen_len=TP_GEN_LEN).tokens
    with torch.no_grad():
        logits = model(torch.tensor([TP_PROMPTS[0]]), return_all_heads=True)
    return dict(tokens=tokens, logits=logits, modes=modes, shapes={n: tuple(p.shape) for n, p in model.named_parameters()})


@pytest.mark.parametrize("layout", ["two_shards", "one_shard"])
def test_tensor_parallel_generation_equals_single_process(tmp_path, tp_checkpoints, tp_reference, layout):
    ranks = W.run_on_ranks("tensor_parallel", tmp_path, ckpt_dir=str(tp_checkpoints / layout), prompts=TP_PROMPTS,
                           max_gen_len=TP_GEN_LEN, speculative_modes=tp_reference["modes"])
    assert len(tp_reference["tokens"]["plain"][0]) == TP_GEN_LEN  # no eos: every step compared
    for rank, got in enumerate(ranks):
        assert got["tokens"] == tp_reference["tokens"], f"rank {rank}"
        assert got["shared_prompt_tokens"] == len(TP_PROMPTS[0])   # each rank copied its share of the K/V
        torch.testing.assert_close(got["logits"], tp_reference["logits"], rtol=1e-5, atol=1e-5)
        # Each rank holds half of every block's attention and FFN weights, and the full embedding/output.
        full = tp_reference["shapes"]
        assert got["shapes"]["layers.0.attention.wq.weight"][0] * 2 == full["layers.0.attention.wq.weight"][0]
        assert got["shapes"]["extra_heads.1.attention.wk.weight"][0] * 2 == full["extra_heads.1.attention.wk.weight"][0]
        assert got["shapes"]["layers.2.attention.wo.weight"][1] * 2 == full["layers.2.attention.wo.weight"][1]
        assert got["shapes"]["layers.1.feed_forward.w2.weight"][1] * 2 == full["layers.1.feed_forward.w2.weight"][1]
        assert got["shapes"]["extra_heads.0.feed_forward.w3.weight"][0] * 2 == full["extra_heads.0.feed_forward.w3.weight"][0]
        for key in ("tok_embeddings.weight", "output.weight", "norm.weight"):
            assert got["shapes"][key] == full[key]
        # Blocks that all-reduce keep one stream: every rank issues its collectives in one order.
        assert got["concurrent_heads"] is False
        # Rank r maps only its own shard file; with one shard every rank slices the one file.
        assert got["files_read"] == [f"consolidated.{rank if layout == 'two_shards' else 0:02d}.pth"]


def test_tensor_parallel_command_errors_are_one_line(tmp_path, tp_checkpoints, capsys, monkeypatch):
    """As `mtp complete`'s: exit 2 and one line naming the problem, not a traceback from every rank."""
    from mtp_engine.tensor_parallel import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)   # one process, no torchrun
    for args, match in ((["--ckpt-dir", str(tmp_path / "nope")], "checkpoint directory not found"),
                        (["--max-gen-len", "0"], "--max-gen-len must be >= 1, got 0"),
                        (["--logit-bias", "x=1"], "--logit-bias takes ID=BIAS (an int token id, a number), got 'x=1'"),
                        (["--samples", "2"], "--samples 2 needs --temperature > 0"),
                        ([], "no tokenizer.model in")):
        argv = ["--ckpt-dir", str(tp_checkpoints / "one_shard"), "--prompt", "x", "--device", "cpu"] + args
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and match in err, err


def test_tensor_parallel_rejects_indivisible_heads():
    from mtp_engine.tensor_parallel import check_tensor_parallel_args

    with pytest.raises(ValueError, match="n_kv_heads 1 .*divisible by 2"):
        check_tensor_parallel_args(W.tiny_args(n_kv_heads=1), 2)
    with pytest.raises(ValueError, match="n_heads 6 and n_kv_heads 3 divisible by 4"):
        check_tensor_parallel_args(W.tiny_args(dim=48, n_heads=6, n_kv_heads=3), 4)
    check_tensor_parallel_args(W.tiny_args(), 2)


def test_tensor_parallel_shard_plan():
    from pathlib import Path

    from mtp_engine.tensor_parallel import _shard_plan

    paths = [Path(f"consolidated.{i:02d}.pth") for i in range(4)]
    assert _shard_plan(4, 2, 1, paths) == (paths[2:4], 0, 1)       # two files per rank
    assert _shard_plan(1, 4, 3, paths[:1]) == (paths[:1], 3, 4)     # every rank slices the one file
    assert _shard_plan(2, 4, 2, paths[:2]) == (paths[1:2], 0, 2)    # two ranks per file
    with pytest.raises(ValueError, match="3 checkpoint shard.* cannot be spread over 2 ranks"):
        _shard_plan(3, 2, 0, paths[:3])


# ------------------------------------------------------------------------------------ GPU
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL: one GPU per rank)")


@pytest.mark.gpu
@pytest.mark.parametrize("opts", [CEOptions(), CEOptions(label_smoothing=0.1, z_loss=1e-2, softcap=30.0)],
                         ids=["plain", "all_options"])
def test_gpu_vp_triton_kernels_bf16(opts):
    """Compiled kernels on bf16 logits of a realistic shard width against the reference twins."""
    from mtp_kernels import vocab_parallel_ce as vp

    g = torch.Generator().manual_seed(5)
    R, V_local, vocab_start, vocab_size = 257, 16000, 16000, 32000
    logits = (torch.randn(R, V_local, generator=g) * 4).to(torch.bfloat16).cuda()
    targets = torch.randint(0, vocab_size, (R,), generator=g)
    targets[::7] = IGNORE
    targets = targets.cuda()
    stats, ref_stats = (torch.empty(3, R, device="cuda") for _ in range(2))
    vp.vp_chunk_stats(logits, targets, vocab_start, stats, opts)
    reference.vp_chunk_stats(logits, targets, vocab_start, ref_stats, opts)
    torch.testing.assert_close(stats, ref_stats, rtol=1e-4, atol=1e-3)
    lse = ref_stats[0] + 0.5
    scale = torch.full((R,), 1.0 / R, device="cuda")
    grad, ref_grad = logits.clone(), logits.clone()
    vp.vp_chunk_grad(grad, targets, vocab_start, vocab_size, lse, scale, opts)
    reference.vp_chunk_grad(ref_grad, targets, vocab_start, vocab_size, lse, scale, opts)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2e-2, atol=1e-5)


@pytest.mark.gpu
@two_gpus
def test_gpu_two_rank_ddp_fsdp_nccl(tmp_path, single_process_training):
    """fp32 on 2 GPUs equals the CPU single process; FSDP2 with bf16 mixed precision stays close."""
    ref = single_process_training
    exact = W.run_on_ranks("train", tmp_path / "fp32", device="cuda", strategies=("ddp", "fsdp"),
                           mixed_precision=False)
    for strategy in ("ddp", "fsdp"):
        for key, expected in ref["state"].items():
            torch.testing.assert_close(exact[0][strategy]["state"][key], expected, rtol=0, atol=1e-4)
    mixed = W.run_on_ranks("train", tmp_path / "bf16", device="cuda", strategies=("fsdp",))
    for key, expected in ref["state"].items():
        torch.testing.assert_close(mixed[0]["fsdp"]["state"][key], expected, rtol=0, atol=3e-2)


@pytest.mark.gpu
@two_gpus
def test_gpu_vocab_parallel_nccl_triton(tmp_path):
    ranks = W.run_on_ranks("vocab_parallel", tmp_path, device="cuda", cases=tuple(W.VP_CASES), backend="triton")
    for name, case in W.VP_CASES.items():
        loss, _, hidden_grad, weight_grad = _single_process_vp(case)
        for rank in (0, 1):
            got = ranks[rank][name]
            lo, hi = W.vp_shard_bounds(case["split"], rank)
            torch.testing.assert_close(got["loss"], loss, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got["hidden_grad"], hidden_grad, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got["weight_grad"], weight_grad[lo:hi], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@two_gpus
def test_gpu_tensor_parallel_nccl(tmp_path, tp_checkpoints, tp_reference):
    ranks = W.run_on_ranks("tensor_parallel", tmp_path, device="cuda", ckpt_dir=str(tp_checkpoints / "two_shards"),
                           prompts=TP_PROMPTS, max_gen_len=TP_GEN_LEN, speculative_modes=tp_reference["modes"],
                           dtype=torch.float32)
    for got in ranks:
        assert got["tokens"] == tp_reference["tokens"]
        torch.testing.assert_close(got["logits"], tp_reference["logits"], rtol=1e-4, atol=1e-4)

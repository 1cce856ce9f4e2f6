"""Checkpoints in Meta's layout: sharded save/load, round trips, and every loader error message."""
import json

import numpy as np
import pytest
import torch

import meta_reference as meta
from mtp_engine.checkpoint import find_shards, load_checkpoint, save_checkpoint, shard_dim
from mtp_engine.model import ModelArgs, Transformer

# Split dims are all even (wq 64, wk/wv 32, w1/w3 224 = ffn rule, output 102; wo 64, w2 224, embeddings 64):
# 2 shards work, 3 do not.
ARGS = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=102, multiple_of=16,
            ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, n_future_tokens=2)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**ARGS, **overrides}, max_seq_len=16, max_batch_size=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model.eval()


def _tokens(vocab=102):
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture
def saved(tmp_path):
    """A 1-shard checkpoint of a random model: (model, dir)."""
    model = _model()
    save_checkpoint(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def _rewrite_shard(path, edit):
    sd = torch.load(path, weights_only=True)
    edit(sd)
    torch.save(sd, path)


def _rewrite_params(ckpt, edit):
    params = json.loads((ckpt / "params.json").read_text())
    edit(params)
    (ckpt / "params.json").write_text(json.dumps(params))


# ------------------------------------------------------------------------------- round trips
def test_round_trip_same_weights_and_logits(saved):
    model, ckpt = saved
    loaded = load_checkpoint(ckpt, max_seq_len=16, max_batch_size=2)
    _assert_same_weights(model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(_tokens(), 0, return_all_heads=True), model(_tokens(), 0, return_all_heads=True))
    assert loaded.params == model.params
    assert torch.equal(loaded.freqs_cis, model.freqs_cis)


def test_params_json_has_only_meta_fields(saved):
    _, ckpt = saved
    params = json.loads((ckpt / "params.json").read_text())
    assert set(params) == {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                           "ffn_dim_multiplier", "norm_eps", "rope_theta", "n_future_tokens"}
    optional_none = _model(n_kv_heads=None, ffn_dim_multiplier=None)
    save_checkpoint(optional_none, ckpt.parent / "plain")
    assert "n_kv_heads" not in json.loads((ckpt.parent / "plain" / "params.json").read_text())
    assert "ffn_dim_multiplier" not in json.loads((ckpt.parent / "plain" / "params.json").read_text())


def test_two_shards_load_to_the_same_model(tmp_path):
    model = _model()
    paths = save_checkpoint(model, tmp_path / "two", shards=2)
    assert [p.name for p in paths] == ["consolidated.00.pth", "consolidated.01.pth"]
    save_checkpoint(model, tmp_path / "one", shards=1)
    one, two = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    _assert_same_weights(one, two)
    _assert_same_weights(model, two)


def test_shards_split_like_fairscale(tmp_path):
    """Column-parallel halves on dim 0, row-parallel and embeddings on dim 1, norms replicated."""
    model = _model()
    save_checkpoint(model, tmp_path, shards=2)
    s0 = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    s1 = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    full = model.state_dict()
    assert torch.equal(s1["layers.0.attention.wq.weight"], full["layers.0.attention.wq.weight"][32:])
    assert torch.equal(s0["output.weight"], full["output.weight"][:51])
    assert torch.equal(s1["extra_heads.0.feed_forward.w2.weight"], full["extra_heads.0.feed_forward.w2.weight"][:, 112:])
    assert torch.equal(s0["tok_embeddings.weight"], full["tok_embeddings.weight"][:, :32])
    assert torch.equal(s1["norm.weight"], full["norm.weight"])
    assert torch.equal(s1["layers.2.ffn_norm.weight"], full["layers.2.ffn_norm.weight"])
    # Saved shards own compact storage: a slice does not drag the whole tensor into the file.
    for t in s1.values():
        assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_shard_dim_rule():
    assert shard_dim("layers.3.attention.wk.weight") == 0
    assert shard_dim("extra_heads.0.feed_forward.w3.weight") == 0
    assert shard_dim("output.weight") == 0
    assert shard_dim("layers.0.attention.wo.weight") == 1
    assert shard_dim("layers.0.feed_forward.w2.weight") == 1
    assert shard_dim("tok_embeddings.weight") == 1
    assert shard_dim("norm.weight") is None
    assert shard_dim("extra_heads.2.attention_norm.weight") is None
    with pytest.raises(KeyError):
        shard_dim("layers.0.attention.bias")


def test_meta_checkpoint_with_vocab_minus_one_and_rope_freqs(tmp_path):
    """Meta's params.json may say vocab_size -1 and old shards carry rope.freqs: both load."""
    ref = meta.random_reference(meta.ModelArgs(**ARGS, max_seq_len=16), seed=2)
    params = {k: v for k, v in ARGS.items()}
    params["vocab_size"] = -1
    meta.save_like_meta(ref, tmp_path, params=params)
    _rewrite_shard(tmp_path / "consolidated.00.pth", lambda sd: sd.update({"rope.freqs": torch.randn(8)}))
    model = load_checkpoint(tmp_path)
    assert model.vocab_size == 102
    with torch.no_grad():
        got = model(_tokens(), 0, return_all_heads=True)
    assert (got - ref.forward(_tokens(), 0, return_all_heads=True)).abs().max() < 1e-4


def test_params_vocab_size_null_or_not_an_int(tmp_path):
    """null counts as unset (as -1: the weights say); a string is a clear error naming params.json."""
    ref = meta.random_reference(meta.ModelArgs(**ARGS, max_seq_len=16), seed=2)
    for value in (None, "102"):
        meta.save_like_meta(ref, tmp_path, params={**ARGS, "vocab_size": value})
        if value is None:
            assert load_checkpoint(tmp_path).vocab_size == 102
        else:
            with pytest.raises(ValueError, match=r"params\.json: vocab_size must be an int .*got '102'"):
                load_checkpoint(tmp_path)


def test_legacy_serialization_shard_loads(saved):
    """A shard in torch's pre-zip format cannot be memory-mapped; it is read whole instead of refused."""
    model, ckpt = saved
    path = ckpt / "consolidated.00.pth"
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(ckpt).output.weight, model.output.weight)


def test_bf16_load(saved):
    model, ckpt = saved
    loaded = load_checkpoint(ckpt, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.freqs_cis.dtype == torch.complex64  # rotary table stays exact
    assert torch.equal(loaded.output.weight, model.output.weight.to(torch.bfloat16))
    with torch.no_grad():
        want = model(_tokens(), 0)
        got = loaded(_tokens(), 0)
    assert got.dtype == torch.float32 and (got - want).abs().max() < 0.1


def test_max_seq_len_override_sizes_rotary_table(saved):
    _, ckpt = saved
    model = load_checkpoint(ckpt, max_seq_len=40, max_batch_size=5)
    assert model.params.max_seq_len == 40 and model.params.max_batch_size == 5
    assert model.freqs_cis.shape == (80, 8)


def test_single_shard_load_gives_compact_separate_storages(saved):
    """No parameter left on meta, none sharing or over-holding storage (no duplicated copies kept alive)."""
    _, ckpt = saved
    model = load_checkpoint(ckpt)
    pointers = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(pointers)) == len(pointers)
    assert not any(p.is_meta for p in model.parameters())
    total = sum(p.untyped_storage().nbytes() for p in model.parameters())
    assert total == sum(p.numel() * p.element_size() for p in model.parameters())


def test_loaded_model_trains(saved):
    """Loaded parameters are ordinary leaf Parameters (requires_grad) even though they came from mmap."""
    _, ckpt = saved
    model = load_checkpoint(ckpt)
    assert all(p.requires_grad and isinstance(p, torch.nn.Parameter) for p in model.parameters())
    model(_tokens(), 0, return_all_heads=True).sum().backward()
    assert model.layers[0].attention.wq.weight.grad is not None


# ------------------------------------------------------------------------------- errors
def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_params_json(saved):
    _, ckpt = saved
    (ckpt / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match="params.json"):
        load_checkpoint(ckpt)


def test_invalid_params_json(saved):
    _, ckpt = saved
    (ckpt / "params.json").write_text("{dim: 64")
    with pytest.raises(ValueError, match="params.json is not valid JSON"):
        load_checkpoint(ckpt)


def test_no_shard(saved):
    _, ckpt = saved
    (ckpt / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match="no consolidated"):
        load_checkpoint(ckpt)


def test_gap_in_shard_numbering(tmp_path):
    save_checkpoint(_model(), tmp_path, shards=2)
    (tmp_path / "consolidated.01.pth").rename(tmp_path / "consolidated.02.pth")
    with pytest.raises(FileNotFoundError, match=r"missing consolidated\.01\.pth"):
        load_checkpoint(tmp_path)
    (tmp_path / "consolidated.02.pth").rename(tmp_path / "consolidated.1.pth")  # ranks parse as ints
    assert [p.name for p in find_shards(tmp_path)] == ["consolidated.00.pth", "consolidated.1.pth"]
    (tmp_path / "consolidated.01.pth").write_bytes((tmp_path / "consolidated.1.pth").read_bytes())
    with pytest.raises(ValueError, match=r"two shards for rank 1: consolidated\.01\.pth and consolidated\.1\.pth"):
        load_checkpoint(tmp_path)


def test_unknown_params_key(saved):
    _, ckpt = saved
    _rewrite_params(ckpt, lambda p: p.update(use_scaled_rope=True))
    with pytest.raises(ValueError, match="use_scaled_rope"):
        load_checkpoint(ckpt)


def test_unexpected_key(saved):
    _, ckpt = saved
    _rewrite_shard(ckpt / "consolidated.00.pth",
                   lambda sd: sd.update({"layers.0.attention.wq.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth.*unexpected keys \['layers\.0\.attention\.wq\.bias'\]"):
        load_checkpoint(ckpt)


def test_missing_key(saved):
    _, ckpt = saved
    _rewrite_shard(ckpt / "consolidated.00.pth", lambda sd: sd.pop("layers.1.ffn_norm.weight"))
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth.*missing keys \['layers\.1\.ffn_norm\.weight'\]"):
        load_checkpoint(ckpt)


def test_wrong_shape(saved):
    _, ckpt = saved
    _rewrite_shard(ckpt / "consolidated.00.pth",
                   lambda sd: sd.update({"layers.0.feed_forward.w1.weight": torch.zeros(224, 63)}))
    with pytest.raises(ValueError, match=r"layers\.0\.feed_forward\.w1\.weight: expected shape \(224, 64\).*got \(224, 63\)"):
        load_checkpoint(ckpt)


def _one_rank_tensor_parallel(ckpt, **kwargs):
    from mtp_engine.distributed import DistEnv
    from mtp_engine.tensor_parallel import load_tensor_parallel
    return load_tensor_parallel(ckpt, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                                              is_main=True), **kwargs)


@pytest.mark.parametrize("load", [load_checkpoint, _one_rank_tensor_parallel])
def test_weights_of_an_integer_or_mixed_dtype(saved, load):
    """Both loaders (the tensor-parallel one shares the checks) name an integer weight and a mix of
    dtypes, and take numpy ints for the sizes."""
    _, ckpt = saved
    key = "layers.0.attention_norm.weight"
    original = torch.load(ckpt / "consolidated.00.pth")[key].clone()
    _rewrite_shard(ckpt / "consolidated.00.pth", lambda sd: sd.update({key: original.long()}))
    for dtype in (None, torch.float32, torch.bfloat16):   # dtype= must not cast it into a float first
        with pytest.raises(ValueError, match=rf"{key}: a model weight must be a floating tensor, got torch.int64"):
            load(ckpt, dtype=dtype)
    _rewrite_shard(ckpt / "consolidated.00.pth", lambda sd: sd.update({key: original.half()}))
    with pytest.raises(ValueError, match=rf"the weights mix dtypes, float16: 1 keys \({key}\); float32: \d+ keys "
                                         r"\(tok_embeddings\.weight, .*; pass dtype="):
        load(ckpt)
    model = load(ckpt, dtype=torch.float32, max_seq_len=np.int64(40))
    assert model.layers[0].attention_norm.weight.dtype == torch.float32 and model.params.max_seq_len == 40


def test_one_shard_of_another_dtype_is_named(tmp_path):
    """torch.cat would promote the merged weights of a float32 shard among float16 ones silently."""
    save_checkpoint(_model(), tmp_path, shards=2, dtype=torch.float16)
    _rewrite_shard(tmp_path / "consolidated.01.pth", lambda sd: sd.update({k: v.float() for k, v in sd.items()}))
    with pytest.raises(ValueError, match=r"tok_embeddings\.weight is float32 in consolidated\.01\.pth but float16 "
                                         r"in consolidated\.00\.pth; pass dtype="):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path, dtype=torch.float32).tok_embeddings.weight.dtype == torch.float32


@pytest.mark.parametrize("vocab_size", [102, -1])
def test_missing_last_shard_is_named_as_the_likely_cause(tmp_path, vocab_size):
    save_checkpoint(_model(), tmp_path, shards=2)
    _rewrite_params(tmp_path, lambda p: p.update(vocab_size=vocab_size))
    (tmp_path / "consolidated.01.pth").unlink()
    source = r"params\.json" if vocab_size > 0 else r"params\.json \(vocab_size 51 from the weights\)"
    with pytest.raises(ValueError, match=rf"tok_embeddings\.weight: expected shape \({abs(vocab_size) if vocab_size > 0 else 51}, "
                                         rf"64\) from {source}, got \(102, 32\).*dim 1 is 1/2 of the expected size; "
                                         r"is a consolidated\.NN\.pth shard missing\? \(1 found\)"):
        load_checkpoint(tmp_path)


def test_wrong_shape_after_merging_shards(tmp_path):
    save_checkpoint(_model(), tmp_path, shards=2)
    _rewrite_shard(tmp_path / "consolidated.01.pth", lambda sd: sd.update({"output.weight": torch.zeros(50, 64)}))
    with pytest.raises(ValueError, match=r"output\.weight: expected shape \(102, 64\).*got \(101, 64\) after merging 2 shards"):
        load_checkpoint(tmp_path)


def test_unmergeable_shard_shapes(tmp_path):
    save_checkpoint(_model(), tmp_path, shards=2)
    _rewrite_shard(tmp_path / "consolidated.01.pth",
                   lambda sd: sd.update({"layers.0.attention.wo.weight": torch.zeros(60, 32)}))
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wo\.weight: shard shapes \[\(64, 32\), \(60, 32\)\]"):
        load_checkpoint(tmp_path)


def test_replicated_norm_differs_between_shards(tmp_path):
    save_checkpoint(_model(), tmp_path, shards=2)
    _rewrite_shard(tmp_path / "consolidated.01.pth", lambda sd: sd["norm.weight"].add_(1))
    with pytest.raises(ValueError, match=r"norm\.weight is replicated.*consolidated\.01\.pth differs"):
        load_checkpoint(tmp_path)


def test_inconsistent_shard_keys(tmp_path):
    save_checkpoint(_model(), tmp_path, shards=2)
    _rewrite_shard(tmp_path / "consolidated.01.pth", lambda sd: sd.pop("layers.2.attention.wv.weight"))
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth.*lacks keys \['layers\.2\.attention\.wv\.weight'\]"):
        load_checkpoint(tmp_path)


def test_n_future_tokens_disagrees_with_extra_heads(saved):
    _, ckpt = saved  # saved with n_future_tokens=2: layers.0..2 + extra_heads.0
    _rewrite_params(ckpt, lambda p: p.update(n_future_tokens=1))
    with pytest.raises(ValueError, match=r"n_future_tokens=1 .*has 1 extra_heads.*n_future_tokens=2 would fit"):
        load_checkpoint(ckpt)


def test_n_layers_disagrees_with_blocks(saved):
    _, ckpt = saved
    _rewrite_params(ckpt, lambda p: p.update(n_layers=6))
    with pytest.raises(ValueError, match=r"expects 5 `layers` and 1 `extra_heads` blocks, but consolidated\.00\.pth has 3 and 1"):
        load_checkpoint(ckpt)


def test_a_stray_block_key_is_named(saved):
    _, ckpt = saved
    _rewrite_shard(ckpt / "consolidated.00.pth", lambda sd: sd.update({"layers.7.attention.wq.weight": torch.zeros(64, 64)}))
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth: block layers\.7 has 1 of a block's 9 keys "
                                         r"\(layers\.7\.attention\.wq\.weight\): a stray or partly written block"):
        load_checkpoint(ckpt)


def test_corrupt_shard(saved):
    _, ckpt = saved
    (ckpt / "consolidated.00.pth").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cannot read checkpoint shard .*consolidated\.00\.pth"):
        load_checkpoint(ckpt)


def test_bad_dtype_argument(saved):
    _, ckpt = saved
    with pytest.raises(ValueError, match="dtype"):
        load_checkpoint(ckpt, dtype=torch.int8)


def test_bad_device_is_an_error_before_any_shard_is_read(saved, monkeypatch):
    _, ckpt = saved
    monkeypatch.setattr("mtp_engine.checkpoint._load_shard", lambda path: pytest.fail("read a shard"))
    with pytest.raises(ValueError, match=r"device 'tpu0' is not a torch device"):
        load_checkpoint(ckpt, device="tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device cuda was asked for but CUDA is not available"):
            load_checkpoint(ckpt, device="cuda")


@pytest.mark.parametrize("field", ["dim", "n_layers", "n_heads"])
def test_params_json_without_a_size_names_it(saved, field):
    _, ckpt = saved
    _rewrite_params(ckpt, lambda p: p.pop(field))
    with pytest.raises(ValueError, match=f"params.json has no '{field}'"):
        load_checkpoint(ckpt)


def test_save_rejects_indivisible_split(tmp_path):
    with pytest.raises(ValueError, match=r"cannot save 3 shards of a model with n_heads=4"):
        save_checkpoint(_model(), tmp_path, shards=3)
    with pytest.raises(ValueError, match=r"cannot split .* into 2 shards"):   # heads divide, the vocabulary does not
        save_checkpoint(_model(vocab_size=101), tmp_path, shards=2)
    with pytest.raises(ValueError, match="shards"):
        save_checkpoint(_model(), tmp_path, shards=0)
    # 2 KV heads over 4 shards: every tensor divides, but a shard would hold half a KV head
    with pytest.raises(ValueError, match=r"cannot save 4 shards of a model with n_kv_heads=2: .*whole attention heads"):
        save_checkpoint(_model(), tmp_path, shards=4)


def test_save_refuses_to_leave_stale_shards(tmp_path):
    save_checkpoint(_model(), tmp_path, shards=2)
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth"):
        save_checkpoint(_model(), tmp_path, shards=1)
    save_checkpoint(_model(seed=1), tmp_path, shards=2)  # overwriting the same shard count is fine
    _assert_same_weights(load_checkpoint(tmp_path), _model(seed=1))


def test_a_save_that_fails_midway_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    """Shard 1 fails to write (a full disk): the folder must still hold the old checkpoint, not the
    new params.json and shard 0 beside the old shard 1 (which loaded without a word), and no temp file."""
    save_checkpoint(_model(seed=0), tmp_path, shards=2)
    save = torch.save
    calls = []

    def failing_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(_model(seed=1, n_layers=5), tmp_path, shards=2)   # another shape, too
    monkeypatch.setattr(torch, "save", save)
    _assert_same_weights(load_checkpoint(tmp_path), _model(seed=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]


def test_saving_over_a_loaded_checkpoint_leaves_the_loaded_model_intact(tmp_path):
    """Loaded weights are memory-mapped: saving into the same directory must not rewrite them in place."""
    save_checkpoint(_model(seed=0), tmp_path)
    loaded = load_checkpoint(tmp_path)
    save_checkpoint(_model(seed=1, vocab_size=2), tmp_path)  # smaller file: in place would mean SIGBUS
    _assert_same_weights(loaded, _model(seed=0))
    assert load_checkpoint(tmp_path).vocab_size == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["consolidated.00.pth", "params.json"]


def test_bad_size_overrides(saved):
    _, ckpt = saved
    with pytest.raises(ValueError, match="max_seq_len"):
        load_checkpoint(ckpt, max_seq_len=0)
    with pytest.raises(ValueError, match="max_batch_size"):
        load_checkpoint(ckpt, max_batch_size=-2)


_MEMORY_PROBE = r"""
import json, sys
import torch
from mtp_engine.checkpoint import load_checkpoint

def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon"):
            fields[key] = int(value.split()[0]) * 1024
    return fields

# First call pays one-time start-up costs (lazy imports, dispatcher set-up): keep them out.
del_me = load_checkpoint(sys.argv[1])
del del_me
before = status()
model = load_checkpoint(sys.argv[1])
total = sum(float(p.float().sum()) for p in model.parameters())  # touch every weight page
after = status()
print(json.dumps({"hwm": after["VmHWM"] - before["VmHWM"], "anon": after["RssAnon"] - before["RssAnon"],
                  "finite": total == total}))
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_single_shard_load_does_not_need_twice_the_checkpoint_in_ram(tmp_path):
    import subprocess
    import sys

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=8000, multiple_of=64,
                                  n_future_tokens=4, max_seq_len=64))
    save_checkpoint(model, tmp_path)
    size = (tmp_path / "consolidated.00.pth").stat().st_size
    del model
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert size > 100e6 and probe["finite"]
    # Weights stay memory-mapped: little private memory, and the peak stays far below 2x the file.
    assert probe["anon"] < 0.25 * size, probe
    assert probe["hwm"] < 1.5 * size, probe

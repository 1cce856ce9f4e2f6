import pytest
import torch
import torch.nn.functional as F

from mtp_engine.loss import MTPLoss, mtp_targets
from mtp_engine.model import ModelArgs, Transformer


def test_mtp_targets_shift_and_ignore():
    tokens = torch.tensor([[10, 11, 12, 13, 14]])
    t = mtp_targets(tokens, 3, ignore_index=-1)
    assert t.shape == (3, 1, 5)
    assert t[0, 0].tolist() == [11, 12, 13, 14, -1]
    assert t[1, 0].tolist() == [12, 13, 14, -1, -1]
    assert t[2, 0].tolist() == [13, 14, -1, -1, -1]
    assert mtp_targets(torch.tensor([[5]]), 2).tolist() == [[[-100]], [[-100]]]
    # the corpus's uint16 token streams are token ids too; a fractional ignore_index is not
    assert torch.equal(mtp_targets(torch.tensor([[5, 6, 7]], dtype=torch.uint16), 2),
                       mtp_targets(torch.tensor([[5, 6, 7]]), 2))
    with pytest.raises(ValueError, match="ignore_index must be an int, got -100.5"):
        mtp_targets(torch.tensor([[5, 6]]), 2, ignore_index=-100.5)


def test_mtp_loss_matches_per_head_cross_entropy_on_model():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=97,
                                  multiple_of=16, n_future_tokens=3, max_seq_len=64))
    tokens = torch.randint(0, 97, (2, 11))
    loss_fn = MTPLoss(3, head_weights=[1.0, 0.5, 0.5])
    out = loss_fn(model.head_hidden(tokens), model.output.weight, tokens)
    out.loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    logits = model(tokens, return_all_heads=True)  # (B, T, n, V)
    targets = mtp_targets(tokens, 3)
    heads = [F.cross_entropy(logits[:, :, i].reshape(-1, 97), targets[i].reshape(-1)) for i in range(3)]
    ref = heads[0] + 0.5 * heads[1] + 0.5 * heads[2]
    ref.backward()
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.per_head, torch.stack(heads).detach(), rtol=1e-5, atol=1e-6)
    assert not out.per_head.requires_grad
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_mtp_loss_shape_errors():
    with pytest.raises(ValueError, match="head_weights"):
        MTPLoss(2, head_weights=[1.0])
    with pytest.raises(ValueError, match="head_hidden must be"):
        MTPLoss(2)(torch.randn(3, 1, 4, 8), torch.randn(10, 8), torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_future=-1), "n_future must be an int >= 1"),
    (dict(n_future=2.0), "n_future must be an int >= 1"),
    (dict(label_smoothing=2.0), r"label_smoothing must be a number in \[0, 1\)"),
    (dict(label_smoothing="0.1"), "label_smoothing"),
    (dict(z_loss=float("nan")), "z_loss must be a finite number"),
    (dict(z_loss=None), "z_loss must be a finite number"),
    (dict(softcap=float("inf")), "softcap must be None or a finite number"),
    (dict(head_weights=[1.0, float("nan")]), "head_weights must be a sequence of finite numbers"),
    (dict(head_weights=5), "head_weights must be a sequence"),
    (dict(ignore_index="x"), "ignore_index must be an int"),
])
def test_mtp_loss_options_are_checked_at_construction(kwargs, match):
    """A bad option is an error when the loss is built, before any data: a NaN would pass every range
    check and make the loss NaN."""
    kwargs = {"n_future": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        MTPLoss(kwargs.pop("n_future"), **kwargs)


def test_tokens_must_be_integer_ids():
    """Float tokens were truncated and bools taken as ids 0 and 1, silently."""
    tokens = torch.randint(0, 10, (1, 6))
    for bad in (tokens.float() + 0.7, tokens > 4):
        with pytest.raises(ValueError, match="tokens must be an integer tensor of token ids"):
            mtp_targets(bad, 2)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        mtp_targets(tokens, 2.5)
    with pytest.raises(ValueError, match="MTPLoss: tokens must be a tensor, got list"):
        MTPLoss(2)(torch.randn(2, 1, 6, 8), torch.randn(10, 8), tokens.tolist())

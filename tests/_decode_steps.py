"""A small model's decode step under the Triton interpreter with its kernel launches recorded (shared
by the tests of what a decode step launches)."""
import pytest
import torch


def recorded_decode_step(model, tokens: torch.Tensor, n_heads: int, record, max_seq_len: int = 32) -> torch.Tensor:
    """Fresh caches, the first 4 tokens of each sequence prefilled, then one cached step over the
    rest: its logits. record(kernel name, launch kwargs) sees every Triton launch of that step (not
    the prefill's)."""
    import triton.runtime.interpreter as interpreter

    run = interpreter.GridExecutor.__call__

    def recording(self, *args, **kwargs):
        record(self.fn.__name__, kwargs)
        return run(self, *args, **kwargs)

    B = tokens.shape[0]
    model.setup_caches(B, max_seq_len)
    lengths = torch.zeros(B, dtype=torch.int32)
    model.forward_cached(tokens[:, :4], lengths, n_heads=n_heads, check_lengths=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter.GridExecutor, "__call__", recording)
        return model.forward_cached(tokens[:, 4:], lengths + 4, n_heads=n_heads, check_lengths=False)

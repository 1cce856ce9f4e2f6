"""Logit bias and repetition, presence and frequency penalties on float32 logits, before temperature
and the cuts.

The rules are vLLM's (and, for repetition, Hugging Face's `RepetitionPenaltyLogitsProcessor`, after
CTRL, Keskar et al. 2019; the bias is OpenAI's logit_bias), applied in vLLM's order:

  bias b_v       logit + b_v, a fixed number per sequence and token (0 for most);
  repetition r   a token seen in the prompt or the generated text: logit / r if the logit is > 0,
                 logit * r otherwise (r > 1 discourages repeats, r < 1 encourages them, 1 is off);
  frequency f    logit - f * count, count = times the token was generated (not the prompt);
  presence p     logit - p * (count > 0).

The history is the sequence's: `counts` (S, V) of generated tokens and `prompt_seen` (S, V), one
row per sequence, and the rows to score map to sequences by `row_seq`. A tree-verification row (a
node of a speculative token tree) also has the drafts on its path, tokens generated before it
that are not yet in `counts`: `path` lists them per row, so a node is scored against exactly the
history plain decoding would have at its position (and speculative decoding stays lossless).

No Triton kernel: the penalties need a row's whole logits, which only the logits path of
`linear_sample` writes (float32, a chunk of rows at a time); these torch ops run on those chunks on
every device, in place.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .backend import finite_number, integer


@dataclass
class TokenPenalties:
    """Penalties and a logit bias for R rows scored against S sequences' histories (shapes below; all
    on the rows' device).

    counts: (S, V) integer, times sequence s generated token v so far; prompt_seen: (S, V) bool, v in
    s's prompt; repetition (> 0), presence and frequency: (S,) floating (`check_penalties`), one per
    sequence (1, 0, 0: no penalty). These five are given together, or all None for a bias alone.
    row_seq: (R,) int64, the sequence of each row, or None (row r is sequence r, R = S). path: (R, L)
    int64, for each row up to L generated tokens that `counts` does not hold yet (a tree node's
    drafts from the root's child down to the node itself), -1 for none; or None. bias: (S, V)
    floating, finite, added to each sequence's logits first (its logit_bias), or None."""
    counts: torch.Tensor | None
    prompt_seen: torch.Tensor | None
    repetition: torch.Tensor | None
    presence: torch.Tensor | None
    frequency: torch.Tensor | None
    row_seq: torch.Tensor | None = None
    path: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    _PENALTY_FIELDS = ("counts", "prompt_seen", "repetition", "presence", "frequency")

    @property
    def sequences(self) -> torch.Tensor:
        """(S, V) counts or bias: the tensor whose rows are the sequences."""
        return self.counts if self.counts is not None else self.bias

    def for_nodes(self, B: int, T: int, paths: torch.Tensor | None = None) -> "TokenPenalties":
        """Rows (b, t) of a (B, T) token tree, row b * T + t, over these B sequences: paths (B, T, L)
        int64, node (b, t)'s drafts below the root (-1 for none); None for a bias alone."""
        row_seq = torch.arange(B * T, device=self.sequences.device) // T   # (repeat_interleave may sync in a capture)
        return replace(self, row_seq=row_seq, path=None if paths is None else paths.reshape(B * T, -1))

    def apply_(self, logits: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Penalizes logits (r, V) float32, the logits of rows[`rows`] (a chunk of the R rows), in
        place, and returns them. Besides them the penalties hold (r, V) float32 counts and one more
        float32 temporary at a time (and (r, V) bool masks): about three times the chunk; a bias
        alone, one."""
        V = self.sequences.shape[1]
        if logits.dim() != 2 or logits.shape[1] != V or logits.dtype != torch.float32:
            raise ValueError(f"TokenPenalties.apply_: logits must be float32 (rows, {V}) (the counts' or bias' "
                             f"vocabulary), got {logits.dtype} {tuple(logits.shape)}")
        seq = (torch.arange(self.sequences.shape[0], device=logits.device)[rows] if self.row_seq is None
               else self.row_seq[rows])
        if self.bias is not None:
            logits.add_(self.bias[seq])
        if self.counts is None:
            return logits
        counts = self.counts[seq].float()                                   # (r, V)
        if self.path is not None:
            path = self.path[rows]
            counts.scatter_add_(1, path.clamp(min=0), (path >= 0).float())
        generated = counts > 0
        seen = self.prompt_seen[seq]
        seen |= generated
        positive = logits > 0
        repetition = self.repetition[seq].float()[:, None]
        # Each where writes back into logits: one (r, V) temporary at a time.
        torch.where(seen & positive, logits / repetition, logits, out=logits)
        torch.where(seen & ~positive, logits * repetition, logits, out=logits)
        counts.mul_(self.frequency[seq].float()[:, None])
        counts.add_(generated * self.presence[seq].float()[:, None])
        return logits.sub_(counts)

    def check(self, R: int, V: int, device: torch.device, name: str) -> None:
        """ValueError naming the problem unless the fields fit R rows of a V-token vocabulary on
        `device`. Values (penalties, counts, bias, row_seq, path) are read where they are on the CPU;
        on a GPU they are the caller's to check (reading them back would sync every step)."""
        given = [f for f in self._PENALTY_FIELDS if getattr(self, f) is not None]
        if given and len(given) < len(self._PENALTY_FIELDS):
            missing = [f for f in self._PENALTY_FIELDS if f not in given]
            raise ValueError(f"{name}: penalties.{', '.join(missing)} missing: counts, prompt_seen, repetition, "
                             "presence and frequency go together (all None for a bias alone)")
        if not given and self.bias is None:
            raise ValueError(f"{name}: penalties hold neither penalties (counts, ...) nor a bias")
        first = self.counts if given else self.bias
        S = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() == 2 else None
        want = {"counts": ((S, V), "integer"), "prompt_seen": ((S, V), "bool"),
                "repetition": ((S,), "floating"), "presence": ((S,), "floating"), "frequency": ((S,), "floating"),
                "row_seq": ((R,), "int64"), "path": ((R, None), "int64"), "bias": ((S, V), "floating")}
        for field, (shape, kind) in want.items():
            t = getattr(self, field)
            if t is None and (field in ("row_seq", "path", "bias") or not given):
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}: penalties.{field} must be a tensor, got {type(t).__name__}")
            ok_kind = {"integer": not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool,
                       "bool": t.dtype == torch.bool, "floating": t.dtype.is_floating_point,
                       "int64": t.dtype == torch.int64}[kind]
            ok_shape = t.dim() == len(shape) and all(w is None or w == n for w, n in zip(shape, t.shape))
            if not (ok_kind and ok_shape):
                unknown = "L" if field == "path" else "S"   # any length; S: the sequences counts holds
                dims = ", ".join(unknown if w is None else str(w) for w in shape)
                raise ValueError(f"{name}: penalties.{field} must be {kind} of shape ({dims}{',' if len(shape) == 1 else ''}), "
                                 f"got {t.dtype} {tuple(t.shape)}")
            if t.device != device:
                raise ValueError(f"{name}: penalties.{field} is on {t.device} but hidden is on {device}")
        if self.row_seq is None and S != R:
            raise ValueError(f"{name}: penalties hold {S} sequence(s) for {R} row(s): give row_seq, the sequence of each row")
        if device.type != "cpu":
            return
        if given:
            for s, values in enumerate(zip(self.repetition.tolist(), self.presence.tolist(), self.frequency.tolist())):
                check_penalties(*values, f"{name}: sequence {s}: ")
            if self.counts.numel() and int(self.counts.min()) < 0:
                raise ValueError(f"{name}: penalties.counts must be >= 0 (times each token was generated)")
        if self.bias is not None and not bool(self.bias.isfinite().all()):
            raise ValueError(f"{name}: penalties.bias must be finite")
        if self.row_seq is not None and R and not bool(((self.row_seq >= 0) & (self.row_seq < S)).all()):
            raise ValueError(f"{name}: penalties.row_seq must hold sequence indices in [0, {S})")
        if self.path is not None and self.path.numel() and not bool(((self.path >= -1) & (self.path < V)).all()):
            raise ValueError(f"{name}: penalties.path must hold token ids in [0, {V}) or -1")


def check_penalties(repetition, presence, frequency, prefix: str = "") -> None:
    """ValueError (message after `prefix`) unless repetition is a number > 0 and presence and
    frequency numbers, all within float32's range (the logits' dtype; repetition at least its
    smallest normal value), the generator's and linear_sample's rule."""
    if not finite_number(repetition) or not _FLOAT32.tiny <= repetition <= _FLOAT32.max:
        raise ValueError(f"{prefix}repetition_penalty must be a number > 0 (1 = none) within float32's range, "
                         f"got {repetition!r}")
    for label, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if not finite_number(value) or not abs(value) <= _FLOAT32.max:
            raise ValueError(f"{prefix}{label} must be a number (0 = none) within float32's range, got {value!r}")


_FLOAT32 = torch.finfo(torch.float32)


def check_logit_bias(logit_bias, vocab_size: int, name: str = "logit_bias") -> dict:
    """logit_bias as {token id: bias} with int ids in [0, vocab_size) and biases finite in float32
    (the generator's rule; None or {} is no bias). Returns it as a dict of Python ints and floats;
    ValueError (starting with `name`) naming the bad id or value."""
    if logit_bias is None:
        return {}
    if not isinstance(logit_bias, dict):
        raise ValueError(f"{name} must be a dict {{token id: bias}} or None, got {type(logit_bias).__name__}")
    checked = {}
    for token, bias in logit_bias.items():
        if not integer(token) or not 0 <= token < vocab_size:
            raise ValueError(f"{name}: token id {_short(token)} is not an int in [0, {vocab_size})")
        if not finite_number(bias) or not abs(bias) <= _FLOAT32.max:
            raise ValueError(f"{name}: the bias of token {token} must be a number within float32's range "
                             f"(|bias| <= {_FLOAT32.max:.4g}), got {_short(bias)}")
        checked[int(token)] = float(bias)
    return checked


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def neutral(repetition, presence, frequency) -> bool:
    """True when these values penalize nothing."""
    return repetition == 1.0 and presence == 0.0 and frequency == 0.0

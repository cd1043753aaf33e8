"""The one hard-negative sampler (STYLE rule 5): ITM training, evaluation and anything else call this.

ALBEF / BLIP sample, for every query, one negative with probability softmax(sim) over the candidates that are
not positives for it. LAVIS copies that loop into five model files; here it is one pure function on tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor


def same_id_mask(row_ids: Tensor, col_ids: Tensor) -> Tensor:
    """(R, C) bool, True where row i and column j carry the same id (same image or same caption)."""
    return row_ids.reshape(-1, 1) == col_ids.reshape(1, -1)  # (R, C)


def sample_negatives(
    sim: Tensor,
    positive_mask: Tensor,
    *,
    hard: bool = True,
    uniform: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One negative candidate per query row, never a positive.

    sim: (B, N) similarity of each query to each candidate (ALBEF passes the temperature-scaled logits, so the
    sharpness of the sampling follows the learned temperature). positive_mask: (B, N) bool, True where the
    candidate is a positive for the query. hard=True samples proportionally to softmax(sim) over the
    non-positives; hard=False samples uniformly over them. uniform in [0, 1] mixes the two: with hard=True,
    p = (1 - uniform) * softmax + uniform * uniform-over-negatives (a floor of easy negatives, so a fusion
    encoder learning from scratch sees pairs it can tell apart). `generator` must live on sim's device.
    Returns (B,) long column indices; -1 for a row whose candidates are all positives (images that share one
    caption, as bootstrapped datasets have many): the caller leaves that row's negative out.
    """
    if sim.dim() != 2 or sim.shape != positive_mask.shape:
        raise ValueError(
            f"sim and positive_mask must both be (B, N); got {tuple(sim.shape)} and {tuple(positive_mask.shape)}"
        )
    if positive_mask.dtype != torch.bool:
        raise ValueError(f"positive_mask must be a bool tensor, got {positive_mask.dtype}")
    allowed = ~positive_mask  # (B, N)
    empty = ~allowed.any(dim=1)  # (B,) rows with nothing to contrast against
    if not 0.0 <= uniform <= 1.0:
        raise ValueError(f"uniform must be in [0, 1], got {uniform}")
    if bool(empty.any()):
        allowed = allowed | empty[:, None]  # a placeholder draw for those rows, replaced by -1 below
    if not hard or uniform == 1.0:
        weights = allowed.float()  # (B, N); multinomial normalises each row
    else:
        soft = _softmax_weights(sim, allowed)  # (B, N)
        weights = soft / soft.sum(dim=1, keepdim=True)
        if uniform:
            weights = (1 - uniform) * weights + uniform * allowed.float() / allowed.sum(dim=1, keepdim=True)
    picked = torch.multinomial(weights, 1, generator=generator).squeeze(1)  # (B,)
    return picked.masked_fill(empty, -1)


def _softmax_weights(sim: Tensor, allowed: Tensor) -> Tensor:
    """Unnormalised softmax over the allowed columns; float32 and max-subtracted so it never overflows."""
    s = sim.detach().float()  # (B, N)
    if torch.isnan(s).any():
        raise ValueError(
            "sim contains NaN; the similarities feeding the negative sampler are broken upstream"
        )
    # Infinities become the extreme finite floats: +inf - +inf would be NaN, and a row whose negatives all sit
    # at -inf then falls back to uniform over them instead of an all-zero (invalid) distribution.
    finfo = torch.finfo(torch.float32)
    s = torch.nan_to_num(s, posinf=finfo.max, neginf=finfo.min)  # (B, N)
    s = s.masked_fill(~allowed, float("-inf"))  # (B, N)
    row_max = s.max(dim=1, keepdim=True).values  # (B, 1), finite: every row has an allowed candidate
    return torch.exp(s - row_max)  # (B, N); masked columns give exp(-inf) = 0, overflow to -inf gives 0 too

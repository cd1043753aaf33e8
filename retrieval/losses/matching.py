"""Image-text matching (ITM): binary classification of (image, text) pairs from the fusion encoder's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def itm_loss(pos_logits: Tensor, neg_logits: Tensor) -> dict[str, Tensor]:
    """Cross-entropy over matched (label 1) and mismatched (label 0) pairs.

    pos_logits: (N, 2), neg_logits: (M, 2); class 1 means "match", as in ALBEF/BLIP.
    Returns {"itm": mean loss over all N + M pairs, "itm_acc": detached accuracy}.
    """
    for name, t in (("pos_logits", pos_logits), ("neg_logits", neg_logits)):
        if t.dim() != 2 or t.shape[1] != 2:
            raise ValueError(f"{name} must be (N, 2), got {tuple(t.shape)}")
    logits = torch.cat([pos_logits, neg_logits], dim=0)  # (N + M, 2)
    labels = torch.cat(
        [
            torch.ones(pos_logits.shape[0], dtype=torch.long, device=logits.device),
            torch.zeros(neg_logits.shape[0], dtype=torch.long, device=logits.device),
        ]
    )  # (N + M,)
    loss = F.cross_entropy(logits.float(), labels)
    acc = (logits.detach().argmax(dim=1) == labels).float().mean()
    return {"itm": loss, "itm_acc": acc}

"""The captioner's loss: next-token cross-entropy over the caption (BLIP's LM objective). Pure: takes logits and
token ids, returns a dict, never holds the model (STYLE rule 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PAD = 0  # the captioner vocabulary's padding id (models/captioner.py)


def lm_loss(logits: Tensor, tokens: Tensor, label_smoothing: float = 0.0) -> dict[str, Tensor]:
    """logits (B, T-1, V) predicting tokens[:, 1:] from tokens[:, :-1]; tokens (B, T) with PAD after EOS.
    Returns {"lm": mean cross-entropy over real target tokens, "lm_acc": their top-1 accuracy}."""
    targets = tokens[:, 1:]  # (B, T-1)
    real = targets != PAD  # (B, T-1)
    flat = logits.reshape(-1, logits.shape[-1]).float()  # (B*(T-1), V)
    loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=PAD, label_smoothing=label_smoothing)
    with torch.no_grad():
        acc = ((logits.argmax(-1) == targets) & real).sum() / real.sum().clamp(min=1)
    return {"lm": loss, "lm_acc": acc}


def sequence_logprob(logits: Tensor, tokens: Tensor) -> Tensor:
    """(B,) summed log-probability of tokens[:, 1:] (PAD ignored): how a captioner scores a given caption."""
    logp = logits.float().log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return (logp * (tokens[:, 1:] != PAD)).sum(1)

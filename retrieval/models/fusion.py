"""ALBEF-style fusion encoder: text tokens self-attend, cross-attend to image patch tokens; an ITM head on top.

`itm_forward` is the single place that composes negative mining, the fusion encoder and the ITM loss for a
training step: losses never hold a model (STYLE rule 4), so the composition lives here, with the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from retrieval.losses.matching import itm_loss
from retrieval.losses.mining import sample_negatives


@dataclass(frozen=True)
class FusionConfig:
    width: int = 256  # hidden size of the fusion layers; small because it only refines towers' outputs
    layers: int = 2  # fusion depth; ALBEF uses 6 on top of BERT, 2 is enough for re-ranking small models
    heads: int = 4  # attention heads; width must divide evenly by it
    mlp_ratio: float = 4.0  # MLP hidden = width * mlp_ratio, the transformer default
    dropout: float = 0.0  # attention and residual branches; 0: towers come pretrained, fusion data is small
    text_width: int = 512  # width of the incoming text token states (set by the caller from the text tower)
    image_width: int = 768  # width of the incoming image patch-token states (from the vision tower)


class _FusionLayer(nn.Module):
    """Pre-norm block: self-attention over text, cross-attention text -> image, MLP."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        w = cfg.width
        self.ln_self = nn.LayerNorm(w)
        self.self_attn = nn.MultiheadAttention(w, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.ln_cross = nn.LayerNorm(w)
        self.cross_attn = nn.MultiheadAttention(w, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.ln_mlp = nn.LayerNorm(w)
        hidden = int(w * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(w, hidden), nn.GELU(), nn.Linear(hidden, w))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, key_padding: Tensor, image: Tensor) -> Tensor:
        h = self.ln_self(x)  # (B, L, W)
        x = x + self.drop(self.self_attn(h, h, h, key_padding_mask=key_padding, need_weights=False)[0])
        h = self.ln_cross(x)  # (B, L, W)
        x = x + self.drop(self.cross_attn(h, image, image, need_weights=False)[0])  # (B, L, W)
        return x + self.drop(self.mlp(self.ln_mlp(x)))  # (B, L, W)


class FusionEncoder(nn.Module):
    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_proj = nn.Linear(cfg.text_width, cfg.width)
        self.image_proj = nn.Linear(cfg.image_width, cfg.width)
        # Image tokens are keys/values in every layer and never updated, so one norm serves all layers.
        self.ln_image = nn.LayerNorm(cfg.width)
        self.blocks = nn.ModuleList(_FusionLayer(cfg) for _ in range(cfg.layers))
        self.ln_out = nn.LayerNorm(cfg.width)
        self.itm_head = nn.Linear(cfg.width, 2)

    def forward(self, text_tokens: Tensor, text_mask: Tensor, image_tokens: Tensor) -> Tensor:
        """text_tokens (B, L, text_width), text_mask (B, L) bool True = real token, image_tokens
        (B, N, image_width) -> (B, L, width). Padded positions come out as zeros."""
        self._check(text_tokens, text_mask, image_tokens)
        key_padding = ~text_mask  # (B, L), MultiheadAttention's convention: True = ignore
        x = self.text_proj(text_tokens)  # (B, L, W)
        image = self.ln_image(self.image_proj(image_tokens))  # (B, N, W)
        for block in self.blocks:
            x = block(x, key_padding, image)  # (B, L, W)
        x = self.ln_out(x)  # (B, L, W)
        # Padded queries still produce values; zero them so nothing downstream can read them by accident.
        return x.masked_fill(key_padding.unsqueeze(-1), 0.0)  # (B, L, W)

    def itm_logits(self, text_tokens: Tensor, text_mask: Tensor, image_tokens: Tensor) -> Tensor:
        """(B, 2) match logits (class 1 = match) from the first text token ([CLS]/BOS)."""
        return self.itm_head(self(text_tokens, text_mask, image_tokens)[:, 0])  # (B, 2)

    def _check(self, text_tokens: Tensor, text_mask: Tensor, image_tokens: Tensor) -> None:
        b, length, tw = text_tokens.shape
        if (
            tw != self.cfg.text_width
            or image_tokens.dim() != 3
            or image_tokens.shape[2] != self.cfg.image_width
        ):
            raise ValueError(
                f"fusion expects text (B, L, {self.cfg.text_width}) and image (B, N, {self.cfg.image_width}) "
                f"tokens; got {tuple(text_tokens.shape)} and {tuple(image_tokens.shape)}"
            )
        if image_tokens.shape[0] != b or text_mask.shape != (b, length) or text_mask.dtype != torch.bool:
            raise ValueError(
                f"text_mask must be bool ({b}, {length}) and image_tokens batch {b}; got mask "
                f"{tuple(text_mask.shape)} {text_mask.dtype}, image batch {image_tokens.shape[0]}"
            )
        # The ITM head reads position 0; a padded first token means left padding or an empty text.
        if not bool(text_mask[:, 0].all()):
            raise ValueError("text_mask[:, 0] must be True: the first token ([CLS]/BOS) feeds the ITM head")


def build_fusion(cfg: FusionConfig) -> FusionEncoder:
    """The one builder for the fusion encoder; an impossible config fails here, loudly."""
    problems = []
    if cfg.width < 1 or cfg.layers < 1 or cfg.heads < 1:
        problems.append(f"width, layers and heads must be >= 1 (got {cfg.width}, {cfg.layers}, {cfg.heads})")
    elif cfg.width % cfg.heads:
        problems.append(f"width {cfg.width} is not divisible by heads {cfg.heads}")
    if cfg.text_width < 1 or cfg.image_width < 1:
        problems.append(f"text_width and image_width must be >= 1 (got {cfg.text_width}, {cfg.image_width})")
    if cfg.mlp_ratio <= 0 or not 0.0 <= cfg.dropout < 1.0:
        problems.append(f"need mlp_ratio > 0 and 0 <= dropout < 1 (got {cfg.mlp_ratio}, {cfg.dropout})")
    if problems:
        raise ValueError("invalid FusionConfig: " + "; ".join(problems))
    return FusionEncoder(cfg)


def itm_forward(
    fusion: FusionEncoder,
    text_tokens: Tensor,
    text_mask: Tensor,
    image_tokens: Tensor,
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    positive_mask: Tensor,
    *,
    hard: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """ITM on B positives, B hard-negative texts (one per image) and B hard-negative images (one per text).

    Row i of text_tokens / text_mask / image_tokens is a matched pair. sim_i2t, sim_t2i: (B, B) in-batch sims
    (use `contrastive.local_block` on clip_loss's (B, B_global) output). positive_mask: (B, B) bool, True where
    image i and text j are a positive pair (same image id / same caption); the diagonal is always positive.
    Returns `matching.itm_loss`'s dict.
    """
    b = text_tokens.shape[0]
    for name, t in (("sim_i2t", sim_i2t), ("sim_t2i", sim_t2i), ("positive_mask", positive_mask)):
        if t.shape != (b, b):
            raise ValueError(
                f"{name} must be ({b}, {b}), the in-batch block; got {tuple(t.shape)} "
                "(slice gathered sims with contrastive.local_block)"
            )
    eye = torch.eye(b, dtype=torch.bool, device=positive_mask.device)
    positives = positive_mask | eye  # (B, B): image i, text j
    with torch.no_grad():
        neg_text = sample_negatives(sim_i2t, positives, hard=hard, generator=generator)  # (B,) per image
        neg_image = sample_negatives(sim_t2i, positives.T, hard=hard, generator=generator)  # (B,) per text
    # One fused pass over [positives; (image i, negative text); (negative image, text i)].
    texts = torch.cat([text_tokens, text_tokens[neg_text], text_tokens])  # (3B, L, Dt)
    masks = torch.cat([text_mask, text_mask[neg_text], text_mask])  # (3B, L)
    images = torch.cat([image_tokens, image_tokens, image_tokens[neg_image]])  # (3B, N, Di)
    logits = fusion.itm_logits(texts, masks, images)  # (3B, 2)
    return itm_loss(logits[:b], logits[b:])

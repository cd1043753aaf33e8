"""ALBEF-style fusion encoder: text tokens self-attend, cross-attend to image patch tokens; an ITM head on top.

`itm_forward` is the single place that composes negative mining, the fusion encoder and the ITM loss for a
training step: losses never hold a model (STYLE rule 4), so the composition lives here, with the model.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class FusionConfig:
    width: int = 256  # hidden size of the fusion layers; small because it only refines towers' outputs
    layers: int = 2  # fusion depth; ALBEF uses 6 on top of BERT, 2 is enough for re-ranking small models
    heads: int = 4  # attention heads; width must divide evenly by it
    mlp_ratio: float = 4.0  # MLP hidden = width * mlp_ratio, the transformer default
    dropout: float = 0.0  # attention and residual branches; 0: towers come pretrained, fusion data is small
    text_width: int = 512  # width of the incoming text token states (set by the caller from the text tower)
    image_width: int = 768  # width of the incoming image patch-token states (from the vision tower)
    readout: str = (
        "last"  # token ITM reads: "last" real one (EOT), the only one a causal text tower (OpenCLIP)
    )
    # has fed the whole caption (position 0 is the same for every caption there and left ITM stuck at the class
    # prior for half a run); "first" ([CLS]) for a bidirectional text encoder
    image_positions: bool = True  # add fixed 2D sin-cos positions to the image tokens (square grids only), so
    # "where is the red thing" is one cross-attention lookup, not whatever position survived the tower. Relations
    # need it; on synth scenes it did not yet move binding (0.817 vs 0.815), the relation's direction is unlearned
    # the image's pooled feature (what ITC compares) as one more key/value token, as ALBEF's cross-attention also
    # reads the [CLS] token. Off: it helped shapes and hurt the axis of a relation, even overall (docs/training.md)
    global_token: bool = False
    global_width: int = 512  # width of that pooled feature (set by the caller: the model's embedding size)


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

    def forward(
        self,
        x: Tensor,
        key_padding: Tensor,
        image: Tensor,
        image_index: Tensor | None,
        only: Tensor | None = None,
    ) -> Tensor:
        """only (B,) long: compute just that position's output per row (B, 1, W), every token still a key:
        exact, and the last layer of an ITM pass needs nothing else (it is ~45% of the fusion's cost)."""
        h = self.ln_self(x)  # (B, L, W)
        q = h
        if only is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            x, q = x[rows, only].unsqueeze(1), h[rows, only].unsqueeze(1)  # (B, 1, W)
        x = x + self.drop(self.self_attn(q, h, h, key_padding_mask=key_padding, need_weights=False)[0])
        h = self.ln_cross(x)  # (B, L or 1, W)
        x = x + self.drop(self._cross(h, image, image_index))  # (B, L, W)
        return x + self.drop(self.mlp(self.ln_mlp(x)))  # (B, L, W)

    def _cross(self, h: Tensor, image: Tensor, image_index: Tensor | None) -> Tensor:
        """Cross-attention with the keys and values projected once per distinct image: ITM scores every image
        against several texts, and projecting the copies was a third of the vision tower's cost. Same weights
        and result as nn.MultiheadAttention(h, image[index], image[index]).

        With image_index the keys and values are not copied per row either (at 6 rows per image, gathering
        them and their gradients was a quarter of a refinement step): queries do not interact in
        cross-attention, so each image's rows are laid end to end as one query sequence against that image
        alone, padded to the most rows any image has (`_query_slots`), and the outputs read back per row."""
        attn = self.cross_attn
        b, length, w = h.shape
        heads = attn.num_heads
        wq, wk, wv = attn.in_proj_weight.chunk(3)  # (W, W) each
        bq, bk, bv = attn.in_proj_bias.chunk(3)  # (W,) each
        k, v = F.linear(image, wk, bk), F.linear(image, wv, bv)  # (M, N, W)
        q = F.linear(h, wq, bq)  # (B, L, W)
        slots, per_image = None, 1
        if image_index is not None:
            slots, per_image = _query_slots(image_index, image.shape[0])  # (B,) rows of (M * R)
            padded = q.new_zeros(image.shape[0] * per_image, length, w)  # (M * R, L, W)
            q = padded.index_put((slots,), q).view(image.shape[0], per_image * length, w)  # (M, R * L, W)

        def split(t: Tensor) -> Tensor:
            return t.unflatten(-1, (heads, w // heads)).transpose(1, 2)  # (., H, ., W / H)

        dropout = attn.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            split(q), split(k), split(v), dropout_p=dropout
        )  # (B or M, H, L or R * L, W/H)
        out = out.transpose(1, 2).reshape(-1, length, w)  # (B or M * R, L, W)
        if slots is not None:
            out = out[slots]  # (B, L, W)
        return attn.out_proj(out)  # (B, L, W)


def _query_slots(image_index: Tensor, n_images: int) -> tuple[Tensor, int]:
    """image_index (B,) long in [0, n_images) -> (slot (B,) long, R): row i is the k-th row (in order) that
    attends to image m = image_index[i], and goes to slot m * R + k of an (n_images * R) layout, R being the
    most rows any image has."""
    counts = torch.bincount(image_index, minlength=n_images)  # (M,)
    per_image = max(int(counts.max()), 1) if len(image_index) else 1
    order = torch.argsort(image_index, stable=True)  # (B,) rows grouped by image
    first = torch.cumsum(counts, 0) - counts  # (M,) position of each image's first row in `order`
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - first[image_index[order]]  # (B,)
    return image_index * per_image + rank, per_image


class FusionEncoder(nn.Module):
    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_proj = nn.Linear(cfg.text_width, cfg.width)
        self.image_proj = nn.Linear(cfg.image_width, cfg.width)
        self.global_proj = nn.Linear(cfg.global_width, cfg.width) if cfg.global_token else None
        # Image tokens are keys/values in every layer and never updated, so one norm serves all layers.
        self.ln_image = nn.LayerNorm(cfg.width)
        self.blocks = nn.ModuleList(_FusionLayer(cfg) for _ in range(cfg.layers))
        self.ln_out = nn.LayerNorm(cfg.width)
        self.itm_head = nn.Linear(cfg.width, 2)

    def forward(
        self,
        text_tokens: Tensor,
        text_mask: Tensor,
        image_tokens: Tensor,
        image_index: Tensor | None = None,
        only: Tensor | None = None,
        image_global: Tensor | None = None,
    ) -> Tensor:
        """text_tokens (B, L, text_width), text_mask (B, L) bool True = real token, image_tokens
        (B, N, image_width) -> (B, L, width). Padded positions come out as zeros. With image_index (B,) long,
        image_tokens holds M distinct images (M, N, image_width) and text row i attends to image_index[i].
        only (B,) long: the last layer computes that position of each row alone; the result is (B, 1, width).
        image_global (B or M, global_width): each image's pooled feature (L2-normalised here), required with
        cfg.global_token."""
        self._check(text_tokens, text_mask, image_tokens, image_index, image_global)
        key_padding = ~text_mask  # (B, L), MultiheadAttention's convention: True = ignore
        x = self.text_proj(text_tokens)  # (B, L, W)
        image = self.image_proj(image_tokens)  # (B or M, N, W)
        if self.cfg.image_positions:
            image = image + grid_positions(image.shape[1], image.shape[2], image.device, image.dtype)
        if self.global_proj is not None:
            pooled = self.global_proj(F.normalize(image_global.to(image.dtype), dim=-1)).unsqueeze(
                1
            )  # (B or M, 1, W)
            image = torch.cat([pooled, image], dim=1)  # (B or M, 1 + N, W)
        image = self.ln_image(image)  # (B or M, N [+ 1], W)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, key_padding, image, image_index, only if i == last else None)  # (B, L or 1, W)
        x = self.ln_out(x)  # (B, L or 1, W)
        if only is not None:
            return x  # (B, 1, W): real positions only
        # Padded queries still produce values; zero them so nothing downstream can read them by accident.
        return x.masked_fill(key_padding.unsqueeze(-1), 0.0)  # (B, L, W)

    def itm_logits(
        self,
        text_tokens: Tensor,
        text_mask: Tensor,
        image_tokens: Tensor,
        image_index: Tensor | None = None,
        image_global: Tensor | None = None,
    ) -> Tensor:
        """(B, 2) match logits (class 1 = match) from the readout token (cfg.readout: the last real one, or the
        first); the same as itm_head(forward(...)[rows, position]), the last layer computing that row alone."""
        position = self.readout_position(text_mask)  # (B,)
        x = self(text_tokens, text_mask, image_tokens, image_index, only=position, image_global=image_global)
        return self.itm_head(x[:, 0])  # (B, 2)

    def readout_position(self, text_mask: Tensor) -> Tensor:
        """(B,) long: the position ITM reads in each row (texts are right-padded, so the last real one is at
        count - 1)."""
        if self.cfg.readout == "first":
            return torch.zeros(text_mask.shape[0], dtype=torch.long, device=text_mask.device)
        return text_mask.sum(dim=1) - 1  # (B,)

    def _check(
        self,
        text_tokens: Tensor,
        text_mask: Tensor,
        image_tokens: Tensor,
        image_index: Tensor | None,
        image_global: Tensor | None,
    ) -> None:
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
        n_images = b if image_index is None else image_tokens.shape[0]
        if image_index is not None and (
            image_index.shape != (b,)
            or (len(image_index) and not 0 <= int(image_index.min()) <= int(image_index.max()) < n_images)
        ):
            raise ValueError(
                f"image_index must be ({b},) indices into {n_images} images; got {tuple(image_index.shape)}"
            )
        if (
            image_tokens.shape[0] != n_images
            or text_mask.shape != (b, length)
            or text_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"text_mask must be bool ({b}, {length}) and image_tokens batch {b}; got mask "
                f"{tuple(text_mask.shape)} {text_mask.dtype}, image batch {image_tokens.shape[0]}"
            )
        if self.cfg.global_token and (
            image_global is None or image_global.shape != (image_tokens.shape[0], self.cfg.global_width)
        ):
            got = None if image_global is None else tuple(image_global.shape)
            raise ValueError(
                f"this fusion reads each image's pooled feature: image_global must be "
                f"({image_tokens.shape[0]}, {self.cfg.global_width}); got {got}"
            )
        # The ITM head reads position 0; a padded first token means left padding or an empty text.
        if not bool(text_mask[:, 0].all()) or bool((text_mask[:, 1:] & ~text_mask[:, :-1]).any()):
            raise ValueError(
                "text_mask must mark a non-empty prefix of each row (right padding): ITM reads its first or last "
                "real token"
            )


@functools.cache
def grid_positions(n: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor | float:
    """(N, W) fixed 2D sin-cos embedding of n tokens on a square grid (row-major, as ViTs emit patch tokens),
    built once per shape, device and dtype; 0.0 when n is not a square (a class token included, a non-square
    image) or width is not a multiple of 4: nothing is added then."""
    side = math.isqrt(n)
    if side * side != n or width % 4:
        return 0.0
    from open_clip.pos_embed import get_2d_sincos_pos_embed

    return torch.from_numpy(get_2d_sincos_pos_embed(width, side)).to(device=device, dtype=dtype)  # (N, W)


def build_fusion(cfg: FusionConfig) -> FusionEncoder:
    """The one builder for the fusion encoder; an impossible config fails here, loudly."""
    problems = []
    if cfg.width < 1 or cfg.layers < 1 or cfg.heads < 1:
        problems.append(f"width, layers and heads must be >= 1 (got {cfg.width}, {cfg.layers}, {cfg.heads})")
    elif cfg.width % cfg.heads:
        problems.append(f"width {cfg.width} is not divisible by heads {cfg.heads}")
    if cfg.text_width < 1 or cfg.image_width < 1 or cfg.global_width < 1:
        problems.append(
            f"text_width, image_width and global_width must be >= 1 (got {cfg.text_width}, {cfg.image_width}, "
            f"{cfg.global_width})"
        )
    if cfg.readout not in ("first", "last"):
        problems.append(f"readout must be 'first' or 'last' (got {cfg.readout!r})")
    if cfg.mlp_ratio <= 0 or not 0.0 <= cfg.dropout < 1.0:
        problems.append(f"need mlp_ratio > 0 and 0 <= dropout < 1 (got {cfg.mlp_ratio}, {cfg.dropout})")
    if problems:
        raise ValueError("invalid FusionConfig: " + "; ".join(problems))
    return FusionEncoder(cfg)

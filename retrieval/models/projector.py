"""Connectors from a vision tower's patch tokens to a causal LLM, all from one builder (build_connector).

linear          each patch token -> one LLM token (LLaVA 1.0)
mlpNx_gelu      N linear layers with GELU between them (LLaVA 1.5: mlp2x_gelu)
downsample2x2   each 2x2 group of neighbouring tokens concatenated, then projected: a quarter of the tokens (VILA)
resampler       K learned queries cross-attend to the patch tokens: K tokens per image (BLIP-2's Q-Former, Flamingo's
                Perceiver resampler)
patches         no vision tower: raw pixel patches linearly projected into the decoder (Fuyu)
xattn           no image tokens in the sequence: gated cross-attention blocks inside the frozen LLM (Flamingo,
                models/xattn.py); the connector projects the patch tokens to the LLM's width as their memory
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from retrieval.errors import UserError
from retrieval.models.fusion import grid_positions

TYPES = ("linear", "mlpNx_gelu", "downsample2x2", "resampler", "patches", "xattn")
_MLP = re.compile(r"^mlp(\d+)x_gelu$")


@dataclass(frozen=True)
class ConnectorConfig:
    type: str = "mlp2x_gelu"  # one of TYPES; mlp2x_gelu is LLaVA 1.5's, cheap and strong
    queries: int = 16  # resampler: learned queries, the image tokens per image
    heads: int = 4  # resampler and xattn: attention heads
    every: int = 4  # xattn: a gated cross-attention block before every M-th LLM layer
    patch: int = 8  # patches: pixel patch side (image side / patch = tokens per row)
    # fixed 2D sin-cos positions added to the tower's patch tokens before the connector (square grids); off:
    # on the 16-token synth tower they did not pay (0.710 -> 0.698 held-out, docs/vlm.md)
    positions: bool = False


class Mlp(nn.Sequential):
    """(B, N, Wv) -> (B, N, D) through `depth` linear layers with GELU between them."""

    def __init__(self, width_in: int, width: int, depth: int) -> None:
        layers: list[nn.Module] = [nn.Linear(width_in, width)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(width, width)]
        super().__init__(*layers)


class Downsample2x2(nn.Module):
    """(B, H*W, Wv) -> (B, H/2*W/2, D): each 2x2 neighbourhood concatenated, then a 2-layer GELU MLP."""

    def __init__(self, width_in: int, width: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.mlp = Mlp(4 * width_in, width, 2)

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        g = self.grid
        x = x.view(b, g // 2, 2, g // 2, 2, c).permute(0, 1, 3, 2, 4, 5)  # (B, g/2, g/2, 2, 2, C)
        return self.mlp(x.reshape(b, (g // 2) ** 2, 4 * c))  # (B, g^2/4, D)


class Resampler(nn.Module):
    """(B, N, Wv) -> (B, K, D): K learned queries attend to the projected patch tokens, then a GELU MLP."""

    def __init__(self, width_in: int, width: int, queries: int, heads: int) -> None:
        super().__init__()
        self.inp = nn.Linear(width_in, width)
        self.queries = nn.Parameter(torch.randn(queries, width) * width**-0.5)
        self.norm_q, self.norm_kv = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(width), Mlp(width, width, 2))

    def forward(self, x: Tensor) -> Tensor:
        kv = self.norm_kv(self.inp(x))  # (B, N, D)
        q = self.norm_q(self.queries).expand(x.shape[0], -1, -1)  # (B, K, D)
        h = q + self.attn(q, kv, kv, need_weights=False)[0]  # (B, K, D)
        return h + self.mlp(h)


class PixelPatches(nn.Module):
    """(B, 3, S, S) normalised pixels -> (B, (S/p)^2, D): Fuyu's linear projection of raw patches, plus a learned
    position per patch (the decoder's own positions only say where a token is in the sequence)."""

    def __init__(self, width: int, patch: int, image_size: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(3 * patch * patch, width)
        self.pos = nn.Parameter(torch.zeros((image_size // patch) ** 2, width))

    def forward(self, x: Tensor) -> Tensor:
        p = nn.functional.unfold(x, self.patch, stride=self.patch).transpose(1, 2)  # (B, N, 3*p*p)
        return self.proj(p) + self.pos


class Connector(nn.Module):
    """One connector: `body` maps the vision input to (B, K, D); `tokens` is K, the image tokens spliced into the
    sequence (0 for xattn, whose output is the cross-attention memory instead)."""

    def __init__(self, cfg: ConnectorConfig, body: nn.Module, tokens: int, needs_vision: bool) -> None:
        super().__init__()
        self.cfg, self.body, self.tokens, self.needs_vision = cfg, body, tokens, needs_vision

    def forward(self, x: Tensor) -> Tensor:
        """The tower's patch tokens (B, N, Wv), or pixels for patches -> (B, K, D)."""
        if self.cfg.positions and self.needs_vision:
            x = x + grid_positions(x.shape[1], x.shape[2], x.device, x.dtype)
        return self.body(x)


def build_connector(
    cfg: ConnectorConfig, vision_width: int | None, grid: int | None, llm_width: int, image_size: int
) -> Connector:
    """The connector of cfg.type for a vision tower of `vision_width`-wide tokens on a `grid` x `grid` patch grid
    (None for patches, which needs no tower) and an LLM of `llm_width`. Unknown types and types that do not fit
    raise UserError with one line."""
    kind = cfg.type
    if kind == "patches":
        if image_size % cfg.patch:
            raise UserError(
                f"connector patches: image size {image_size} is not a multiple of patch {cfg.patch}"
            )
        body = PixelPatches(llm_width, cfg.patch, image_size)
        return Connector(cfg, body, (image_size // cfg.patch) ** 2, needs_vision=False)
    if vision_width is None or grid is None:
        raise UserError(
            f"connector {kind} needs a vision tower (--vision CKPT); only patches works without one"
        )
    n = grid * grid
    m = _MLP.match(kind)
    if kind == "linear":
        return Connector(cfg, nn.Linear(vision_width, llm_width), n, True)
    if m:
        depth = int(m.group(1))
        if depth < 1:
            raise UserError(f"connector {kind}: needs at least one layer")
        return Connector(cfg, Mlp(vision_width, llm_width, depth), n, True)
    if kind == "downsample2x2":
        if grid % 2:
            raise UserError(
                f"connector downsample2x2: the vision tower's {grid}x{grid} patch grid is not even"
            )
        return Connector(cfg, Downsample2x2(vision_width, llm_width, grid), n // 4, True)
    if kind == "resampler":
        if cfg.queries < 1 or llm_width % cfg.heads:
            raise UserError(
                f"connector resampler: queries={cfg.queries}, heads={cfg.heads} do not fit width {llm_width}"
            )
        return Connector(cfg, Resampler(vision_width, llm_width, cfg.queries, cfg.heads), cfg.queries, True)
    if kind == "xattn":
        return Connector(cfg, nn.Linear(vision_width, llm_width), 0, True)
    raise UserError(
        f"unknown connector type {kind!r}; known: {', '.join(TYPES)} (N a number, e.g. mlp2x_gelu)"
    )

"""Colour-consistent recolouring: permute the hues an image's colour words name, and the words with them.

A generative decoder (the captioner, the VLM's LLM) learns which words follow which; when a training set never
shows a green square, "green" is never followed by "square" and the decoder will not write it, whatever the image
says. Recolouring a training image (every pixel whose hue falls in the red bin moves to the green bin, and so on,
by one permutation of the named hues) and rewriting its colour words by the same permutation gives true pairs for
combinations the data lacks, so the next word must come from the image. Saturation and brightness stay, and so do
the unsaturated colours (white, grey, black) that no hue names.

Only basic chromatic colour words with a hue of their own are permuted; captions that use none are unchanged.
`share_with_colours` measures how much of a caption set talks about colour, to turn the augmentation on where it
applies (see the callers' `recolour=auto`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from retrieval.errors import UserError

# Hue centres in degrees of the basic chromatic colour terms; a pixel belongs to the nearest centre's bin.
HUES: dict[str, float] = {
    "red": 0.0,
    "orange": 30.0,
    "yellow": 55.0,
    "green": 120.0,
    "cyan": 180.0,
    "blue": 230.0,
    "purple": 280.0,
}
NAMES = tuple(HUES)
_CENTRES = torch.tensor([HUES[n] for n in NAMES])  # (K,)
_WORD = re.compile(r"\b(" + "|".join(NAMES) + r")\b", re.IGNORECASE)
MIN_SATURATION = 0.25  # below this a pixel is grey-ish: no colour word names it, so it keeps its hue
MIN_VALUE = 0.15  # near-black pixels have no reliable hue


def names_colour(text: str) -> bool:
    return _WORD.search(text) is not None


def share_with_colours(captions: Sequence[str], sample: int = 20000) -> float:
    """Share of captions (the first `sample`) that name a chromatic colour."""
    head = captions[:sample]
    return sum(names_colour(c) for c in head) / max(1, len(head))


def colours_named(captions: Sequence[str], sample: int = 20000) -> list[int]:
    """Indices (into NAMES) of the colour words the captions use: the only ones a permutation should move, so
    a recoloured caption uses no word the training data lacks (a captioner's vocabulary is cut to its data)."""
    seen = {m.lower() for c in captions[:sample] for m in _WORD.findall(c)}
    return [i for i, name in enumerate(NAMES) if name in seen]


def swap_words(text: str, perm: Sequence[int]) -> str:
    """The text with each colour word w replaced by NAMES[perm[index of w]], keeping a leading capital."""

    def sub(m: re.Match) -> str:
        word = m.group(0)
        new = NAMES[perm[NAMES.index(word.lower())]]
        if word.isupper() and len(word) > 1:
            return new.upper()
        return new.capitalize() if word[0].isupper() else new

    return _WORD.sub(sub, text)


def draw_permutations(
    n: int, p: float, generator: torch.Generator, among: Sequence[int] | None = None
) -> list[list[int] | None]:
    """For each of n rows, with probability p a random permutation of the named hues that moves only the bins
    `among` (default: all) among themselves, else None (unchanged)."""
    if p <= 0:
        return [None] * n
    among = list(range(len(NAMES))) if among is None else list(among)
    chosen = torch.rand(n, generator=generator) < p  # (n,)
    perms: list[list[int] | None] = []
    for c in chosen.tolist():
        order = torch.randperm(len(among), generator=generator).tolist()
        perm = list(range(len(NAMES)))
        for src, k in zip(among, order, strict=True):
            perm[src] = among[k]
        perms.append(perm if c else None)
    return perms


def recolour(pixels: Tensor, perms: Sequence[Sequence[int] | None]) -> Tensor:
    """uint8 (B, 3, H, W) -> uint8 (B, 3, H, W): in row b, each saturated pixel's hue moves from its bin's centre
    to the centre of bin perms[b][bin], keeping its offset from the centre; rows whose perm is None are copied."""
    out = pixels.clone()
    rows = [b for b, perm in enumerate(perms) if perm is not None]
    if not rows:
        return out
    x = pixels[rows].float() / 255  # (R, 3, H, W)
    hue, sat, val = _rgb_to_hsv(x)  # each (R, H, W); hue in degrees
    diff = (hue[:, None] - _CENTRES[None, :, None, None] + 180) % 360 - 180  # (R, K, H, W) signed distance
    bin_ = diff.abs().argmin(1)  # (R, H, W)
    offset = diff.gather(1, bin_[:, None]).squeeze(1)  # (R, H, W)
    table = torch.tensor([list(perms[b]) for b in rows])  # (R, K)
    target = table.gather(1, bin_.flatten(1)).view_as(bin_)  # (R, H, W) the bin each pixel moves to
    moved = (_CENTRES[target] + offset) % 360  # (R, H, W)
    keep = (sat < MIN_SATURATION) | (val < MIN_VALUE)  # (R, H, W)
    hue = torch.where(keep, hue, moved)
    out[rows] = (_hsv_to_rgb(hue, sat, val) * 255).round().clamp(0, 255).to(torch.uint8)
    return out


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x (R, 3, H, W) in [0, 1] -> hue in degrees [0, 360), saturation, value, each (R, H, W)."""
    r, g, b = x.unbind(1)
    val, argmax = x.max(1)
    chroma = val - x.min(1).values
    safe = chroma.clamp(min=1e-8)
    h = torch.where(
        argmax == 0, ((g - b) / safe) % 6, torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    hue = torch.where(chroma > 0, h * 60, torch.zeros_like(h))
    sat = torch.where(val > 0, chroma / val.clamp(min=1e-8), torch.zeros_like(val))
    return hue, sat, val


def _hsv_to_rgb(hue: Tensor, sat: Tensor, val: Tensor) -> Tensor:
    """Inverse of _rgb_to_hsv: (R, 3, H, W) in [0, 1]."""
    h = hue / 60
    c = val * sat
    k = torch.stack([(5 + h) % 6, (3 + h) % 6, (1 + h) % 6], 1)  # (R, 3, H, W) for r, g, b
    return val[:, None] - c[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


AUTO_SHARE = 0.5  # recolour=auto turns on when at least this share of captions name a chromatic colour: data
# about coloured things (synth scenes, product photos), not photo captions in general (COCO: ~15-20%)
MODES = ("auto", "on", "off")


def choose(mode: str, prob: float, texts: Sequence[str]) -> tuple[float, str]:
    """(probability of recolouring a row, why) for a recolour setting of auto | on | off."""
    if mode not in MODES:
        raise UserError(f"recolour={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "off" or prob <= 0:
        return 0.0, f"recolour off ({'recolour=off' if mode == 'off' else 'recolour_prob=0'})"
    colours = [NAMES[i] for i in colours_named(texts)]
    if len(colours) < 2:
        return 0.0, f"recolour off (the texts name {len(colours)} chromatic colour(s): nothing to permute)"
    if mode == "on":
        return prob, f"recolour on (recolour=on, p={prob:g}, among {', '.join(colours)})"
    share = share_with_colours(texts)
    on = share >= AUTO_SHARE
    state = f"on, p={prob:g}, among {', '.join(colours)}" if on else "off"
    return (
        prob if on else 0.0
    ), f"recolour {state} (auto: {share:.0%} of texts name a colour; on at >= {AUTO_SHARE:.0%})"

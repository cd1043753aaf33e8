"""Mirror twins: a batch row's image flipped, its spatial words swapped to match, added to the same batch.

Which way a relation points ("a red circle to the left of a blue square" against "... to the right of ...") is
what a contrastive model from scratch fails to learn (bags of words; Yuksekgonul et al., ICLR 2023): a random batch
almost never holds two images that differ only in it, and a rule-made reversed caption contrasts captions for
one image, which leaves the image tower without a signal until the text tower has one (and the other way round).
A mirrored twin is the missing contrast on the image side: the same objects, the relation reversed, and a caption
that differs in one word. With the original and its twin in one batch, ITC has to tell the two apart, ITM's
negatives mined by similarity are exactly those twins, and ITM re-ranking learns s(I, T) > s(mirror(I), T),
which is what ranking the images for one caption needs.

A horizontal flip swaps left and right (and leftmost/rightmost); a vertical flip, when enabled, swaps above and
below, top and bottom, upper and lower. A row whose caption names no direction of an enabled axis gets a plain
horizontal mirror with the same caption (an augmentation, a positive of its original). Photos with text in them
read backwards in a mirror; for such data lower the share or turn it off (`twins=0`).
"""

from __future__ import annotations

import re

import torch

from retrieval.train.negatives import relation_opposite

HORIZONTAL = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
VERTICAL = {
    "above": "below",
    "below": "above",
    "top": "bottom",
    "bottom": "top",
    "upper": "lower",
    "lower": "upper",
    "over": "under",
    "under": "over",
    "higher": "lower",  # one way: "lower" mirrors to "upper" above
}
_WORDS = {
    axis: re.compile(r"\b(" + "|".join(words) + r")\b", re.IGNORECASE)
    for axis, words in (("h", HORIZONTAL), ("v", VERTICAL))
}


def _swap(caption: str, axis: str) -> str:
    table = HORIZONTAL if axis == "h" else VERTICAL

    def replace(m: re.Match[str]) -> str:
        word = m.group(1)
        new = table[word.lower()]
        if word.isupper():
            return new.upper()
        return new.capitalize() if word[0].isupper() else new

    return _WORDS[axis].sub(replace, caption)


def mirror(caption: str, vertical: bool = True) -> tuple[str, bool, bool]:
    """(twin caption, flip horizontally, flip vertically) for a caption's mirror twin.

    The image is flipped along every axis the caption names a direction of (vertical only when enabled), its
    words swapped to match; a caption naming none gets a horizontal flip and stays as it is."""
    flip_h = bool(_WORDS["h"].search(caption))
    flip_v = vertical and bool(_WORDS["v"].search(caption))
    if flip_h:
        caption = _swap(caption, "h")
    if flip_v:
        caption = _swap(caption, "v")
    return caption, flip_h or not flip_v, flip_v


def directional(caption: str, vertical: bool = True) -> bool:
    """Whether the caption's twin differs from it (it names a direction of an enabled axis)."""
    return bool(_WORDS["h"].search(caption)) or (vertical and bool(_WORDS["v"].search(caption)))


def mirror_pixels(pixels: torch.Tensor, flip_h: bool, flip_v: bool) -> torch.Tensor:
    """(3, H, W) -> the same flipped along W (horizontal) and/or H (vertical)."""
    dims = [d for d, on in ((-1, flip_h), (-2, flip_v)) if on]
    return pixels.flip(dims) if dims else pixels


def opposite_caption(caption: str, vertical: bool) -> str | None:
    """The caption with its relation reversed: by the relation lexicon (negatives.relation_opposite), else by
    swapping its direction words (left <-> right, and above <-> below with vertical mirrors), which reverses a
    relation in any wording; None when it names none."""
    found = relation_opposite(caption)
    if found is None and directional(caption, vertical):
        found = mirror(caption, vertical)[0]
    return found

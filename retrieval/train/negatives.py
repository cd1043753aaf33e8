"""Generated hard-negative captions (NegCLIP, SVLC): the caption with its attributes swapped or its relation changed.

A contrastive batch almost never holds two captions that differ only in which object is red, or in "left of" vs
"above", so a dual encoder trained on real batches learns bags of words (Yuksekgonul et al., ICLR 2023). Adding,
for every pair, one rule-made false caption as an extra negative (ITC's text side and ITM) teaches the binding
and the relations directly. The rules are plain word edits, no parser:

- swap two different words of one attribute class that the caption names (colours, sizes): binding
- swap the head nouns on the two sides of a spatial relation: binding of the shapes/objects
- swap the two phrases around a spatial relation ("X left of Y" -> "Y left of X"): direction
- replace the relation with another of its family (left of -> right of, above, below): direction and axis
- a caption with nothing to swap gets one attribute word changed (red -> blue, small -> large)

A candidate is kept only if every word bigram in it occurs somewhere in the training captions (`Vocabulary`):
negatives recombine what the data says and never invent a phrase it lacks (on synth scenes, never a held-out
colour-shape combination). Edits that cannot apply leave the row without a negative; the losses mask it out.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Sequence

COLOURS = (
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "pink",
    "brown",
    "black",
    "white",
    "grey",
    "gray",
)
SIZES = ("small", "large", "big", "little", "tiny", "huge")
OPPOSITE_SIZE = {
    "small": "large",
    "large": "small",
    "big": "small",
    "little": "big",
    "tiny": "huge",
    "huge": "tiny",
}
# Spatial phrases and their opposites (the one edit only the direction tells apart); replacing a phrase by its
# opposite or by a phrase of the other axis makes a caption false. Matched longest first.
_OPPOSITE = {
    "to the left of": "to the right of",
    "on the left of": "on the right of",
    "left of": "right of",
    "to its left": "to its right",
    "above": "below",
    "over": "under",
    "on top of": "beneath",
    "underneath": "on top of",
}
_OPPOSITE.update({v: k for k, v in list(_OPPOSITE.items()) if v not in _OPPOSITE})
RELATIONS = tuple(sorted(_OPPOSITE, key=len, reverse=True))
_HORIZONTAL = {
    "to the left of",
    "to the right of",
    "on the left of",
    "on the right of",
    "left of",
    "right of",
    "to its left",
    "to its right",
}
_RELATION_FAMILY = {
    r: (_OPPOSITE[r], *(("above", "below") if r in _HORIZONTAL else ("to the left of", "to the right of")))
    for r in RELATIONS
}
_RELATION_RE = re.compile(r"\b(" + "|".join(sorted(RELATIONS, key=len, reverse=True)) + r")\b")
_WORD_RE = re.compile(r"[a-z]+")


def _bigrams(text: str) -> set[int]:
    """64-bit hashes of the word bigrams (a million captions' bigrams then fit in a few hundred MB); stable across
    processes, unlike hash(), so a vocabulary built in one process answers in DataLoader workers too."""
    words = _WORD_RE.findall(text.lower())
    return {
        int.from_bytes(hashlib.blake2b(f"{a} {b}".encode(), digest_size=8).digest(), "little")
        for a, b in zip(words, words[1:], strict=False)
    }


class Vocabulary:
    """The word bigrams of the training captions: what a generated negative may contain."""

    def __init__(self, captions: Iterable[str]) -> None:
        self.bigrams: set[int] = set()
        for caption in set(captions):
            self.bigrams |= _bigrams(caption)

    def allows(self, caption: str) -> bool:
        return _bigrams(caption) <= self.bigrams


def _swap_words(words: list[str], i: int, j: int) -> str:
    out = list(words)
    out[i], out[j] = out[j], out[i]
    return " ".join(out)


def candidates(caption: str) -> list[str]:
    """Every rule-made false version of `caption` (lower-cased, single-spaced); empty when no rule applies."""
    text = " ".join(caption.lower().split())
    words = text.split(" ")
    found: list[str] = []
    for vocabulary in (COLOURS, SIZES):
        at = [k for k, w in enumerate(words) if w in vocabulary]
        for a in range(len(at)):
            for b in range(a + 1, len(at)):
                if words[at[a]] != words[at[b]]:
                    found.append(_swap_words(words, at[a], at[b]))
    match = _RELATION_RE.search(text)
    if match:
        left, relation, right = text[: match.start()].strip(), match.group(1), text[match.end() :].strip()
        if left and right:
            found.append(f"{right} {relation} {left}")  # the phrases swapped: the direction reversed
            lw, rw = left.split(" "), right.split(" ")
            if lw[-1] != rw[-1]:  # head nouns swapped, everything else in place
                found.append(" ".join([*lw[:-1], rw[-1], relation, *rw[:-1], lw[-1]]))
            found.extend(f"{left} {other} {right}" for other in _RELATION_FAMILY[relation])
    if not found:  # one object: change an attribute instead of swapping two
        for k, w in enumerate(words):
            if w in COLOURS:
                found.extend(" ".join([*words[:k], c, *words[k + 1 :]]) for c in COLOURS if c != w)
            elif w in OPPOSITE_SIZE:
                found.append(" ".join([*words[:k], OPPOSITE_SIZE[w], *words[k + 1 :]]))
    return [c for c in dict.fromkeys(found) if c != text]


def relation_opposite(caption: str) -> str | None:
    """`caption` with its spatial relation replaced by the opposite one ("left of" -> "right of", "above" ->
    "below"), everything else in place; None without a relation between two phrases. The one edit that only the
    direction tells apart: both objects, their attributes and the axis stay true."""
    text = " ".join(caption.lower().split())
    match = _RELATION_RE.search(text)
    if not match or not text[: match.start()].strip() or not text[match.end() :].strip():
        return None
    return f"{text[: match.start()]}{_RELATION_FAMILY[match.group(1)][0]}{text[match.end() :]}"


def binding_candidates(caption: str) -> list[str]:
    """The rule-made false versions of `caption` that keep its relation and phrase order: attribute and head-noun
    swaps, or one attribute changed (a single object). With relation_opposite, what the ITM refinement ranks."""
    text = " ".join(caption.lower().split())
    match = _RELATION_RE.search(text)
    if not match:
        return candidates(text)
    keep = []
    for c in candidates(text):
        m = _RELATION_RE.search(c)
        # same relation word at the same place, and not the phrase swap (which changes the direction)
        if m and m.group(1) == match.group(1) and c[: m.start()].strip() != text[match.end() :].strip():
            keep.append(c)
    return keep


def negative_caption(caption: str, rng: random.Random, vocabulary: Vocabulary | None = None) -> str | None:
    """One false version of `caption`, drawn uniformly among the rule-made ones the vocabulary allows; or None."""
    options = candidates(caption)
    if vocabulary is not None:
        options = [c for c in options if vocabulary.allows(c)]
    return rng.choice(options) if options else None


def negative_captions(
    captions: Sequence[str], seed: int, vocabulary: Vocabulary | None = None
) -> tuple[list[str], list[bool]]:
    """(negatives, valid) for a batch: rows without a negative repeat their caption and are marked invalid."""
    rng = random.Random(seed)
    out, valid = [], []
    for caption in captions:
        negative = negative_caption(caption, rng, vocabulary)
        out.append(negative if negative is not None else caption)
        valid.append(negative is not None)
    return out, valid

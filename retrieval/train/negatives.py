"""Generated hard-negative captions (NegCLIP, SVLC): the caption with its attributes swapped or its relation changed.

A contrastive batch almost never holds two captions that differ only in which object is red, or in "left of" vs
"above", so a dual encoder trained on real batches learns bags of words (Yuksekgonul et al., ICLR 2023). Adding,
for every pair, one rule-made false caption as an extra negative (ITC's text side and ITM) teaches the binding
and the relations directly. The rules are plain word edits, no parser:

- swap two different words of one attribute class that the caption names (colours, sizes): binding
- swap the head nouns on the two sides of a spatial relation: binding of the shapes/objects
- swap the two phrases around a spatial relation ("X left of Y" -> "Y left of X"): direction
- replace the relation with another of its family (left of -> right of, above, below): direction and axis
- turn the layout a quarter: direction words of one axis replaced by the other's ("left" <-> "top", "right" <->
  "bottom"), in any wording: the axis, which a batch of other scenes never contrasts
- a caption with nothing to swap gets one attribute word changed (red -> blue, small -> large)
- replace a word by one the training captions use in the same places for other images (`substitutes`: a
  circle for a square, a cat for a dog), learned from the data, so nouns and attributes no word list names get
  negatives too

A candidate is kept only if every word bigram in it occurs somewhere in the training captions (`Vocabulary`):
negatives recombine what the data says and never invent a phrase it lacks (on synth scenes, never a held-out
colour-shape combination). Edits that cannot apply leave the row without a negative; the losses mask it out.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import torch

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
# Direction words of one axis and their counterparts on the other: the layout turned a quarter. Word level, so
# any wording that names the direction by one of these words gets an axis negative; those that name it otherwise
# ("higher up") get none, and the bigram check drops the swaps no training caption could say ("its bottom" when
# no caption has it).
_AXIS = {"left": "top", "right": "bottom", "leftmost": "topmost", "rightmost": "bottommost"}
_AXIS.update({v: k for k, v in list(_AXIS.items())})
_AXIS_RE = re.compile(r"\b(" + "|".join(_AXIS) + r")\b")
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
    """The word bigrams of the training captions: what a generated negative may contain; and, given the captions
    grouped by image, the words each word may be replaced by (`substitutes`)."""

    def __init__(self, captions: Iterable[str], groups: Iterable[Sequence[str]] = ()) -> None:
        self.bigrams: set[int] = set()
        for caption in set(captions):
            self.bigrams |= _bigrams(caption)
        self.substitutes = substitutes(groups)

    def allows(self, caption: str) -> bool:
        return _bigrams(caption) <= self.bigrams

    def describe(self) -> str:
        """One line for the run log: which words have substitutes, or why none."""
        if not self.substitutes:
            return "no word substitutes (they need several captions per image)"
        shown = ", ".join(f"{w} -> {'/'.join(v[:3])}" for w, v in list(self.substitutes.items())[:3])
        return f"word substitutes for {len(self.substitutes)} words ({shown}, ...)"


_CONTEXT_BUCKETS = 1 << 14  # hashed (previous word, next word) contexts: 2,000 words x 16k floats = 128 MB


def substitutes(
    groups: Iterable[Sequence[str]],
    min_count: int = 20,
    similarity: float = 0.8,
    max_synonymy: float = 0.05,
    max_words: int = 2000,
) -> dict[str, tuple[str, ...]]:
    """word -> the words that can replace it to make a false caption, learned from captions grouped by image.

    Two words are alternatives when they fill the same places (cosine >= `similarity` between their counts of
    (previous word, next word) contexts, over the `max_words` most frequent words seen `min_count` times): red and
    blue, square and circle, dog and cat. Words that fill the same places can also be synonyms (over and above,
    man and person), and replacing one by its synonym leaves the caption true. The captions of one image tell
    them apart: two captions of an image say one and the other (one without the other) for synonyms, almost
    never for alternatives, whose every caption names both or neither. A pair is kept when that happens in at
    most `max_synonymy` of the images with several captions naming either word; data with one caption per image
    gives no such evidence, and no substitutes."""
    groups = [list(dict.fromkeys(g)) for g in groups]
    if not any(len(g) > 1 for g in groups):
        return {}
    count: Counter[str] = Counter()
    for g in groups:
        for caption in g:
            count.update(_WORD_RE.findall(caption.lower()))
    words = [w for w, n in count.most_common(max_words) if n >= min_count]
    if len(words) < 2:
        return {}
    index = {w: i for i, w in enumerate(words)}
    contexts = torch.zeros(len(words), _CONTEXT_BUCKETS)  # (V, C)
    for g in groups:
        for caption in g:
            seq = ["<s>", *_WORD_RE.findall(caption.lower()), "</s>"]
            for prev, word, nxt in zip(seq, seq[1:], seq[2:], strict=False):
                if word in index:
                    h = hashlib.blake2b(f"{prev} {nxt}".encode(), digest_size=4).digest()
                    contexts[index[word], int.from_bytes(h, "little") % _CONTEXT_BUCKETS] += 1
    contexts = torch.nn.functional.normalize(contexts, dim=1)
    sim = contexts @ contexts.T  # (V, V) cosine
    sim.fill_diagonal_(0)
    a, b = (sim >= similarity).triu().nonzero(as_tuple=True)
    pairs = {(words[i], words[j]) for i, j in zip(a.tolist(), b.tolist(), strict=True)}
    if not pairs:
        return {}
    involved = {w for pair in pairs for w in pair}
    seen: Counter[tuple[str, str]] = Counter()
    exclusive: Counter[tuple[str, str]] = Counter()
    for g in groups:
        if len(g) < 2:
            continue
        sets = [set(_WORD_RE.findall(c.lower())) & involved for c in g]
        present = set().union(*sets)
        for x in present:
            for y in present:
                if (x, y) not in pairs:
                    continue
                seen[(x, y)] += 1
                only_x = any(x in s and y not in s for s in sets)
                only_y = any(y in s and x not in s for s in sets)
                exclusive[(x, y)] += only_x and only_y
    out: dict[str, list[str]] = {}
    for x, y in sorted(pairs):
        if exclusive[(x, y)] <= max_synonymy * seen[(x, y)]:
            out.setdefault(x, []).append(y)
            out.setdefault(y, []).append(x)
    return {w: tuple(sorted(v)) for w, v in out.items()}


def substituted(caption: str, table: Mapping[str, Sequence[str]]) -> list[str]:
    """For each word of `caption` (lower-cased, single-spaced) that has substitutes, the caption with it replaced
    by one of them, chosen by a hash of the caption and the position (stable across runs and processes); the
    words the caption already names are never chosen."""
    words = " ".join(caption.lower().split()).split(" ")
    present = set(words)
    out = []
    for k, w in enumerate(words):
        options = [s for s in table.get(w, ()) if s not in present]
        if options:
            h = hashlib.blake2b(f"{k} {caption}".encode(), digest_size=4).digest()
            pick = options[int.from_bytes(h, "little") % len(options)]
            out.append(" ".join([*words[:k], pick, *words[k + 1 :]]))
    return out


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
    turned = None if match else axis_swapped(text)  # the lexicon's relations change axis by their family
    if turned is not None:
        found.append(turned)
    if not found:  # one object: change an attribute instead of swapping two
        for k, w in enumerate(words):
            if w in COLOURS:
                found.extend(" ".join([*words[:k], c, *words[k + 1 :]]) for c in COLOURS if c != w)
            elif w in OPPOSITE_SIZE:
                found.append(" ".join([*words[:k], OPPOSITE_SIZE[w], *words[k + 1 :]]))
    return [c for c in dict.fromkeys(found) if c != text]


def axis_swapped(caption: str) -> str | None:
    """`caption` (lower-cased, single-spaced) with every direction word moved to the other axis ("left: a red
    circle; right: a blue square" -> "top: ...; bottom: ..."): the same objects, the layout turned a quarter;
    None when it names no direction by these words."""
    text = " ".join(caption.lower().split())
    turned = _AXIS_RE.sub(lambda m: _AXIS[m.group(1)], text)
    return turned if turned != text else None


def relation_opposite(caption: str) -> str | None:
    """`caption` with its spatial relation replaced by the opposite one ("left of" -> "right of", "above" ->
    "below"), everything else in place; None without a relation between two phrases. The one edit that only the
    direction tells apart: both objects, their attributes and the axis stay true."""
    text = " ".join(caption.lower().split())
    match = _RELATION_RE.search(text)
    if not match or not text[: match.start()].strip() or not text[match.end() :].strip():
        return None
    return f"{text[: match.start()]}{_RELATION_FAMILY[match.group(1)][0]}{text[match.end() :]}"


def binding_candidates(caption: str, table: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """The rule-made false versions of `caption` that keep its relation and phrase order: attribute and head-noun
    swaps, or one attribute changed (a single object), and the words replaced by their substitutes (`table`,
    Vocabulary.substitutes). With relation_opposite, what the ITM refinement ranks."""
    text = " ".join(caption.lower().split())
    extra = [
        c for c in substituted(text, table or {}) if not _RELATION_RE.search(c) or _same_relation(c, text)
    ]
    match = _RELATION_RE.search(text)
    if not match:
        return list(dict.fromkeys([*candidates(text), *extra]))
    keep = []
    for c in candidates(text):
        m = _RELATION_RE.search(c)
        # same relation word at the same place, and not the phrase swap (which changes the direction)
        if m and m.group(1) == match.group(1) and c[: m.start()].strip() != text[match.end() :].strip():
            keep.append(c)
    return list(dict.fromkeys([*keep, *extra]))


def _same_relation(a: str, b: str) -> bool:
    ma, mb = _RELATION_RE.search(a), _RELATION_RE.search(b)
    return bool(
        ma
        and mb
        and ma.group(1) == mb.group(1)
        and len(a[: ma.start()].split()) == len(b[: mb.start()].split())
    )


def negative_caption(caption: str, rng: random.Random, vocabulary: Vocabulary | None = None) -> str | None:
    """One false version of `caption` that the vocabulary allows, or None: half the time (when there are both) a
    word replaced by a substitute, else drawn uniformly among the rule-made swaps and edits, so the many
    replacements a caption allows do not crowd out its few swaps."""
    options = candidates(caption)
    replaced = substituted(caption, vocabulary.substitutes) if vocabulary is not None else []
    if vocabulary is not None:
        options = [c for c in options if vocabulary.allows(c)]
        replaced = [c for c in replaced if vocabulary.allows(c) and c not in options]
    if replaced and (not options or rng.random() < 0.5):
        return rng.choice(replaced)
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

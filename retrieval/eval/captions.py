"""Caption metrics, in our own code (no Java, no download): corpus BLEU-4 (Papineni et al. 2002) and CIDEr-D
(Vedantam et al. 2015, as the COCO caption evaluation computes it: tf-idf n-gram vectors with idf over the
evaluated images' references, clipped, a Gaussian length penalty, x10), and for `data synth` scenes the share of
generated captions that name every colour, size, shape and the relation right.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from retrieval.models.captioner import words

N = 4  # n-gram orders of BLEU-4 and CIDEr
SIGMA = 6.0  # CIDEr-D's length penalty width (COCO's)


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4: clipped n-gram precisions summed over the corpus, geometric mean, brevity penalty against
    the reference length closest to each candidate's. 0 when some order has no match."""
    matched, total = [0] * N, [0] * N
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references, strict=True):
        c = words(cand)
        rs = [words(r) for r in refs]
        cand_len += len(c)
        ref_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1] if rs else 0
        for n in range(1, N + 1):
            counts = _ngrams(c, n)
            best: Counter = Counter()
            for r in rs:
                best |= _ngrams(r, n)  # max count of each n-gram over the references
            matched[n - 1] += sum(min(k, best[g]) for g, k in counts.items())
            total[n - 1] += max(0, len(c) - n + 1)
    if cand_len == 0 or min(matched) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matched, total, strict=True)) / N
    brevity = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)
    return brevity * math.exp(log_p)


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean CIDEr-D over the images (COCO's definition, x10)."""
    refs_tok = [[words(r) for r in refs] for refs in references]
    df: Counter = Counter()
    for refs in refs_tok:
        df.update({g for r in refs for n in range(1, N + 1) for g in _ngrams(r, n)})
    log_images = math.log(max(1, len(references)))

    def vectors(tokens: list[str]) -> tuple[list[dict], list[float]]:
        vecs, norms = [], []
        for n in range(1, N + 1):
            v = {g: k * (log_images - math.log(max(1.0, df[g]))) for g, k in _ngrams(tokens, n).items()}
            vecs.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vecs, norms

    scores = []
    for cand, refs in zip(candidates, refs_tok, strict=True):
        c = words(cand)
        cv, cn = vectors(c)
        total = 0.0
        for r in refs:
            rv, rn = vectors(r)
            delta = len(c) - len(r)
            sims = []
            for n in range(N):
                dot = sum(min(x, rv[n].get(g, 0.0)) * rv[n].get(g, 0.0) for g, x in cv[n].items())
                sim = dot / (cn[n] * rn[n]) if cn[n] and rn[n] else 0.0
                sims.append(sim * math.exp(-(delta**2) / (2 * SIGMA**2)))
            total += sum(sims) / N
        scores.append(10.0 * total / max(1, len(refs)))
    return sum(scores) / max(1, len(scores))


def synth_correct(caption: str, objects: Sequence[dict[str, str]], relation: str | None) -> bool:
    """Whether a generated caption names every colour, size and shape of a synth scene and its relation
    (either order: 'A left of B' is 'B right of A')."""
    from retrieval.data.synth import parse_caption, scene_key

    try:
        got = scene_key(*parse_caption(" ".join(words(caption))))
    except ValueError:
        return False
    return got == scene_key(objects, relation)


def caption_metrics(
    candidates: Sequence[str], references: Sequence[Sequence[str]], scenes: Sequence[Any] | None = None
) -> dict[str, float]:
    """BLEU-4 and CIDEr-D; with scenes ((objects, relation) per image, None where unknown) the synth share
    fully right over the images whose scene is known."""
    out = {
        "bleu4": round(bleu4(candidates, references), 4),
        "cider": round(cider_d(candidates, references), 4),
    }
    if scenes is not None:
        known = [(c, s) for c, s in zip(candidates, scenes, strict=True) if s is not None]
        if known:
            out["synth_correct"] = round(sum(synth_correct(c, *s) for c, s in known) / len(known), 4)
            out["synth_scenes"] = len(known)
    return out


def evaluate_captioner(
    model, pairs_source: str, limit: int | None = None, device=None, gen=None, progress: bool = False
) -> dict[str, Any]:
    """Caption the images of a pairs source (greedy unless `gen` says otherwise) and score them against all of
    each image's captions."""
    from retrieval.data.grouping import group_pairs
    from retrieval.data.pairs import iter_pairs
    from retrieval.pipelines.caption import caption_pairs

    groups = group_pairs(iter_pairs(pairs_source))
    n = len(groups) if limit is None else min(limit, len(groups))
    images = groups.images[:n]
    refs = [[groups.captions[c] for c in groups.captions_of(i)] for i in range(n)]
    scenes = [_scene(p.extra) for p in images]
    captions = caption_pairs(model, images, gen, device=device, progress=progress)
    return {**caption_metrics(captions, refs, scenes), "images": n}


def _scene(extra: dict[str, Any]) -> tuple[list, str | None] | None:
    objects = extra.get("objects")
    if not objects:
        return None
    return objects, extra.get("relation")

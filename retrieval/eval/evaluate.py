"""The evaluation pipeline behind `retrieval eval` and the training loop's periodic eval.

pairs -> distinct images and distinct text queries -> ITC similarities -> recall@K both ways, optionally
the top K re-ranked by the ITM head, and on synth scenes binding accuracy against hard negative captions
(the metrics themselves live in metrics.py).

Memory: image features are kept for the whole gallery, N x D floats. Re-ranking and binding also keep every
image's patch tokens on `device`, N x tokens x width floats: 1000 images of 64 px at width 128 is
1000 x 65 x 128 x 4 B = 33 MB; 5000 COCO images with ViT-B/16 would be 5000 x 197 x 768 x 4 B = 3 GB.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from retrieval.data.grouping import image_key, normalize_caption
from retrieval.data.images import ImageDecodeError, load_for_model
from retrieval.data.pairs import Pair
from retrieval.data.synth import caption_for, hard_negatives, parse_caption, scene_key
from retrieval.errors import UserError
from retrieval.eval.metrics import binding_accuracy, recall_at_k, rerank_score, rerank_top_k
from retrieval.models.albef import PAD_ID, AlbefModel, encode_image_tokens, encode_text_tokens, itm_match_prob
from retrieval.models.encoders import normalize

# captions -> (B, L) token ids, e.g. open_clip.get_tokenizer(arch)
Tokenizer = Callable[[list[str]], Tensor]
Report = dict[str, float | int]  # metric name -> value, e.g. {"t2i.R@1": 0.42, "n_images": 1000}


@dataclass(frozen=True)
class EvalConfig:
    rerank_k: int = 0  # 0: no ITM re-ranking; K: re-rank each query's top K by the ITM head (K fusion passes)
    limit: int | None = None  # use only the first N images: fast periodic evals during training
    batch_size: int = 128  # images or texts per encoder pass
    itm_batch_size: int = 256  # (text, image) pairs per fusion pass: amortises the call, stays in cache
    binding: bool = True  # attribute-binding score when rows carry synth structure (extra objects/relation)
    seed: int = 0  # hard-negative caption sampling, so two evals of one model see the same negatives

    def __post_init__(self) -> None:
        if self.rerank_k < 0 or self.batch_size < 1 or self.itm_batch_size < 1:
            raise UserError(
                f"eval: need rerank_k >= 0, batch_size >= 1 and itm_batch_size >= 1 (got {self.rerank_k}, "
                f"{self.batch_size}, {self.itm_batch_size})"
            )
        if self.limit is not None and self.limit < 1:
            raise UserError(f"eval: limit must be >= 1 image or None for all, got {self.limit}")


@dataclass
class _Encoded:
    """One side (images or texts) of the evaluation, encoded once."""

    feat: Tensor  # (N, D) L2-normalised
    tokens: Tensor | None  # (N, T, W) token states, kept only when the ITM head will read them
    mask: Tensor | None = None  # (N, T) bool, True for real text tokens; None for images


def caption_key(pair: Pair) -> str:
    """When two captions are one text query: the same synth scene (whatever the wording: read from the caption
    in the fixed wording, or from a clean row's scene fields), else the same lower-cased text. A noisy row's
    caption describes another scene, and the query is the caption.
    """
    if "objects" in pair.extra:
        try:
            return scene_key(*parse_caption(pair.caption))
        except ValueError:  # another wording: the row's own scene when its caption is its own
            if pair.extra.get("clean_caption") == pair.caption and "relation" in pair.extra:
                return scene_key(pair.extra["objects"], pair.extra["relation"])
    return pair.caption.strip().lower()


def evaluate(
    model: AlbefModel,
    pairs: list[Pair],
    cfg: EvalConfig,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    tokenizer: Tokenizer,
    device: torch.device,
) -> Report:
    """Recall@{1,5,10} image->text ("i2t.R@1") and text->image ("t2i.R@1"); with cfg.rerank_k the same after the
    top K are re-ranked by `metrics.rerank_score` ("rerank.*": ITC logit + ITM log-odds) and by ITM alone
    ("rerank_itm.*"), on synth rows "binding" (ITM), "binding.itc" and "binding.rerank" (the re-ranking score), each
    also per kind of false caption
    ("binding.relation", "binding.itc.color", ...), and the counts "n_images", "n_texts", "skipped_images".

    Images that fail to decode are skipped and counted. The model is put in eval mode and restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _evaluate(model, pairs, cfg, image_size, mean, std, tokenizer, device)
    finally:
        model.train(was_training)


def _evaluate(model, pairs, cfg: EvalConfig, image_size, mean, std, tokenizer, device) -> Report:
    first: dict[str, Pair] = {}  # image key -> its first row, in file order
    for p in pairs:
        key = image_key(p)
        if key not in first and (cfg.limit is None or len(first) < cfg.limit):
            first[key] = p
    if not first:
        raise UserError("no image-text pairs to evaluate")
    candidates = list(first.values())
    binding = cfg.binding and any("objects" in p.extra for p in candidates)
    fused = cfg.rerank_k > 0 or binding  # the ITM head will run, so keep the token states it reads
    gallery, images = _encode_images(model, candidates, image_size, mean, std, device, cfg.batch_size, fused)

    queries, positive = _queries(pairs, {image_key(p): i for i, p in enumerate(gallery)})
    positive = positive.to(device)  # (T, I)
    rows, truths, negatives, kinds = _binding_captions(gallery, cfg.seed) if binding else ([], [], [], [])
    # One text table: queries first (index t is query t), then binding captions not already among them.
    captions = list(dict.fromkeys([*queries, *truths, *(c for negs in negatives for c in negs)]))
    texts = _encode_texts(model, tokenizer, captions, device, cfg.batch_size, fused)
    itm = _PairScorer(model, texts, images, cfg.itm_batch_size) if fused else None

    sim = texts.feat[: len(queries)] @ images.feat.T  # (T, I) cosine similarity
    result: Report = {
        "n_images": len(gallery),
        "n_texts": len(queries),
        "skipped_images": len(candidates) - len(gallery),
    }
    result.update(_prefixed("i2t", recall_at_k(sim.T, positive.T)))
    result.update(_prefixed("t2i", recall_at_k(sim, positive)))
    if cfg.rerank_k > 0:
        assert itm is not None
        scale = float(model.logit_scale.exp())
        cpu = sim.cpu()  # (T, I)

        def fused(text: Tensor, image: Tensor) -> Tensor:
            return rerank_score(cpu[text.cpu(), image.cpu()], itm(text, image), scale)

        # "rerank": by rerank_score (ITC logit + ITM log-odds); "rerank_itm": by ITM alone, as ALBEF does
        for name, score in (("rerank", fused), ("rerank_itm", itm)):
            reranked = rerank_top_k(
                sim.T, cfg.rerank_k, lambda image, text, f=score: f(text, image)
            )  # (I, T)
            result.update(_prefixed(f"{name}.i2t", recall_at_k(reranked, positive.T)))
            reranked = rerank_top_k(sim, cfg.rerank_k, score)  # (T, I)
            result.update(_prefixed(f"{name}.t2i", recall_at_k(reranked, positive)))
    if binding and any(negatives):
        assert itm is not None
        index = {c: j for j, c in enumerate(captions)}
        neg_idx = [[index[c] for c in negs] for negs in negatives]
        scale = float(model.logit_scale.exp())
        result.update(_binding(itm, texts, images, rows, [index[c] for c in truths], neg_idx, kinds, scale))
    return result


def _queries(pairs: list[Pair], image_of: dict[str, int]) -> tuple[list[str], Tensor]:
    """The text queries of the gallery's rows, every distinct caption (COCO protocol: all captions of an image
    are queries), and the (T, I) bool positives: the images with a caption of the same meaning (caption_key),
    so an image-to-text hit is any of its captions, and a text-to-image hit any image it describes."""
    query_of: dict[str, int] = {}  # normalised text -> query
    queries: list[str] = []
    meaning: list[str] = []  # caption_key of each query
    images_of: dict[str, set[int]] = {}  # caption_key -> images with a caption of it
    for p in pairs:
        image = image_of.get(image_key(p))
        if image is None:
            continue
        key = caption_key(p)
        images_of.setdefault(key, set()).add(image)
        if query_of.setdefault(normalize_caption(p.caption), len(queries)) == len(queries):
            queries.append(p.caption)
            meaning.append(key)
    positive = torch.zeros(len(queries), len(image_of), dtype=torch.bool)  # (T, I)
    for t, key in enumerate(meaning):
        positive[t, list(images_of[key])] = True
    return queries, positive


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}.{k}": v for k, v in metrics.items()}


def _encode_images(
    model: AlbefModel,
    candidates: list[Pair],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch: int,
    keep_tokens: bool,
) -> tuple[list[Pair], _Encoded]:
    """Decode and encode batch by batch, so pixels never pile up: (the decodable rows, their encodings)."""
    gallery: list[Pair] = []
    feats: list[Tensor] = []
    tokens: list[Tensor] = []
    for start in range(0, len(candidates), batch):
        pixels = []
        for pair in candidates[start : start + batch]:
            try:
                array, _, _ = load_for_model(pair.image, image_size)  # (S, S, 3) uint8
            except ImageDecodeError:
                continue
            pixels.append(torch.from_numpy(array).permute(2, 0, 1))  # (3, S, S)
            gallery.append(pair)
        if not pixels:
            continue
        x = normalize(torch.stack(pixels), list(mean), list(std), device)  # (B, 3, S, S)
        pooled, tok = encode_image_tokens(model.clip, x)  # (B, D), (B, N, Wv)
        feats.append(F.normalize(pooled.float(), dim=-1))
        if keep_tokens:
            tokens.append(tok)
    if not gallery:
        raise UserError(f"none of the {len(candidates)} images could be decoded")
    return gallery, _Encoded(torch.cat(feats), torch.cat(tokens) if keep_tokens else None)


def _encode_texts(
    model: AlbefModel,
    tokenizer: Tokenizer,
    captions: list[str],
    device: torch.device,
    batch: int,
    keep_tokens: bool,
) -> _Encoded:
    feats: list[Tensor] = []
    tokens: list[Tensor] = []
    masks: list[Tensor] = []
    for start in range(0, len(captions), batch):
        ids = tokenizer(captions[start : start + batch]).to(device)  # (B, L)
        pooled, tok = encode_text_tokens(model.clip, ids)  # (B, D), (B, L, Wt)
        feats.append(F.normalize(pooled.float(), dim=-1))
        if keep_tokens:
            tokens.append(tok)
            masks.append(ids != PAD_ID)
    if not keep_tokens:
        return _Encoded(torch.cat(feats), None)
    return _Encoded(torch.cat(feats), torch.cat(tokens), torch.cat(masks))


class _PairScorer:
    """ITM match probability of (text, image) index pairs, each pair computed once per evaluation.

    The i2t and t2i re-ranking lists and the binding truths overlap (mutual nearest neighbours of a trained
    model), and a fusion pass is the expensive part of an eval, so scores are remembered by pair.
    """

    def __init__(self, model: AlbefModel, texts: _Encoded, images: _Encoded, batch: int) -> None:
        assert texts.tokens is not None and texts.mask is not None and images.tokens is not None
        self.model, self.texts, self.images, self.batch = model, texts, images, batch
        self.n_images = images.tokens.shape[0]
        self.keys = torch.empty(0, dtype=torch.long)  # (K,) sorted text * n_images + image
        self.values = torch.empty(0)  # (K,) their scores

    def __call__(self, text_idx: Tensor, image_idx: Tensor) -> Tensor:
        """text_idx, image_idx (P,) -> (P,) match probabilities on the CPU."""
        wanted, inverse = torch.unique(text_idx.cpu() * self.n_images + image_idx.cpu(), return_inverse=True)
        pos = torch.searchsorted(self.keys, wanted).clamp_(max=max(len(self.keys) - 1, 0))  # (U,)
        known = self.keys[pos] == wanted if len(self.keys) else torch.zeros_like(wanted, dtype=torch.bool)
        missing = wanted[~known]  # (M,)
        fresh = self._score(missing // self.n_images, missing % self.n_images)  # (M,)
        scores = torch.empty(len(wanted))  # (U,)
        scores[known] = self.values[pos[known]]
        scores[~known] = fresh
        self.keys, order = torch.sort(torch.cat([self.keys, missing]))
        self.values = torch.cat([self.values, fresh])[order]
        return scores[inverse]  # (P,)

    def _score(self, text_idx: Tensor, image_idx: Tensor) -> Tensor:
        device = self.images.tokens.device
        # Shortest texts first, so each batch pads only to similar lengths (see the cut below).
        by_length = self.texts.mask.sum(dim=1).cpu()[text_idx].argsort(stable=True)  # (P,)
        text_idx, image_idx = text_idx[by_length], image_idx[by_length]
        out: list[Tensor] = [torch.empty(0)]
        for start in range(0, len(text_idx), self.batch):
            t = text_idx[start : start + self.batch].to(device)  # (B,)
            i = image_idx[start : start + self.batch].to(device)  # (B,)
            mask = self.texts.mask[t]  # (B, L)
            # Columns padded in every row change nothing (padded keys are masked, ITM reads token 0)
            length = int(mask.any(dim=0).nonzero().max()) + 1
            tokens = self.texts.tokens[t, :length]  # (B, length, Wt)
            images, index = torch.unique(i, return_inverse=True)  # each image's keys/values projected once
            probs = itm_match_prob(self.model, tokens, mask[:, :length], self.images.tokens[images], index)
            out.append(probs.float().cpu())
        return torch.cat(out)[by_length.argsort()]  # (P,) back in the order asked for


def _binding_captions(
    gallery: list[Pair], seed: int
) -> tuple[list[int], list[str], list[list[str]], list[list[str]]]:
    """For each synth image: its gallery index, its true caption, its hard negative captions and their kinds."""
    rng = random.Random(seed)
    rows: list[int] = []
    truths: list[str] = []
    negatives: list[list[str]] = []
    kinds: list[list[str]] = []
    for i, pair in enumerate(gallery):
        if "objects" not in pair.extra:
            continue
        try:
            # From the structure, not the caption: a noisy row's caption is not its image's truth.
            truths.append(caption_for(pair.extra["objects"], pair.extra.get("relation")))
            found = hard_negatives(pair.extra, rng)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{pair.key}: its objects/relation columns are not a synth scene ({e})") from e
        negatives.append([caption for _, caption in found])
        kinds.append([kind for kind, _ in found])
        rows.append(i)
    return rows, truths, negatives, kinds


def _binding(
    itm: _PairScorer,
    texts: _Encoded,
    images: _Encoded,
    rows: list[int],
    truths: list[int],
    negatives: list[list[int]],
    kinds: list[list[str]],
    logit_scale: float,
) -> dict[str, float]:
    """Image rows[r] with text truths[r] vs texts negatives[r] (of kinds[r]), by ITM ("binding"), by ITC
    ("binding.itc") and by the score ITM re-ranking sorts by ("binding.rerank": ITC logit + ITM log-odds,
    `metrics.rerank_score`), and by each per kind of negative ("binding.relation", "binding.itc.relation", ...)."""
    neg_idx = torch.full((len(rows), max(map(len, negatives))), -1, dtype=torch.long)  # (R, M), -1: none
    for r, negs in enumerate(negatives):
        neg_idx[r, : len(negs)] = torch.tensor(negs, dtype=torch.long)
    present = neg_idx >= 0  # (R, M)
    image_idx = torch.tensor(rows, dtype=torch.long)  # (R,)
    # one batched run over every comparison: the R truths, then the present negatives row-major
    text_all = torch.cat([torch.tensor(truths, dtype=torch.long), neg_idx[present]])  # (R + P,)
    image_all = torch.cat([image_idx, image_idx.unsqueeze(1).expand_as(neg_idx)[present]])  # (R + P,)
    device = images.feat.device
    itc = (texts.feat[text_all.to(device)] * images.feat[image_all.to(device)]).sum(-1).cpu()  # (R + P,)

    def split(scores: Tensor) -> tuple[Tensor, Tensor]:
        padded = torch.full(neg_idx.shape, float("nan"))  # (R, M)
        padded[present] = scores[len(rows) :]
        return scores[: len(rows)], padded

    kind_of = torch.full(neg_idx.shape, -1, dtype=torch.long)  # (R, M) index into names, -1: none
    names = sorted({kind for ks in kinds for kind in ks})
    for r, ks in enumerate(kinds):
        kind_of[r, : len(ks)] = torch.tensor([names.index(k) for k in ks], dtype=torch.long)
    result: dict[str, float] = {}
    match = itm(text_all, image_all)  # (R + P,)
    scorers = (
        ("binding", match),
        ("binding.itc", itc),
        ("binding.rerank", rerank_score(itc, match, logit_scale)),
    )
    for name, scores in scorers:
        truth, negative = split(scores)
        result[name] = binding_accuracy(truth, negative)
        for k, kind in enumerate(names):
            result[f"{name}.{kind}"] = binding_accuracy(
                truth, negative.masked_fill(kind_of != k, float("nan"))
            )
    return result

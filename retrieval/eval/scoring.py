"""What every evaluation shares: images and texts encoded once (features, and token states where the ITM head
will read them), ITM match probabilities of (text, image) pairs computed once each, and the comparison of a true
caption against its false ones by ITC, ITM and the re-ranking score.

Used by the recall evaluation (evaluate.py), attribute binding on caption + negative-caption triples
(binding.py) and zero-shot classification (zeroshot.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.data.images import ImageDecodeError, load_for_model
from retrieval.data.pairs import Pair
from retrieval.errors import UserError
from retrieval.eval.metrics import binding_accuracy, rerank_score
from retrieval.models.albef import (
    AlbefModel,
    encode_image_tokens,
    encode_text_tokens,
    itm_match_prob,
    text_mask,
)
from retrieval.models.encoders import normalize

# captions -> (B, L) token ids, e.g. open_clip.get_tokenizer(arch)
Tokenizer = Callable[[list[str]], Tensor]


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside the block; the module's own mode is restored after it."""
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        module.train(was_training)


@dataclass
class Encoded:
    """One side (images or texts) of the evaluation, encoded once."""

    feat: Tensor  # (N, D) L2-normalised
    tokens: Tensor | None  # (N, T, W) token states, kept only when the ITM head will read them
    mask: Tensor | None = None  # (N, T) bool, True for real text tokens; None for images


def encode_images(
    clip: nn.Module,
    candidates: list[Pair],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch: int,
    keep_tokens: bool,
) -> tuple[list[Pair], Encoded]:
    """Decode and encode batch by batch with the OpenCLIP model `clip`, so pixels never pile up: (the
    decodable rows, their encodings). keep_tokens: keep the patch tokens the ITM head reads."""
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
        if keep_tokens:
            pooled, tok = encode_image_tokens(clip, x)  # (B, D), (B, N, Wv)
            tokens.append(tok)
        else:  # any tower: no token states needed
            pooled = clip.encode_image(x)  # (B, D)
        feats.append(F.normalize(pooled.float(), dim=-1))
    if not gallery:
        raise UserError(f"none of the {len(candidates)} images could be decoded")
    return gallery, Encoded(torch.cat(feats), torch.cat(tokens) if keep_tokens else None)


def encode_texts(
    clip: nn.Module,
    tokenizer: Tokenizer,
    captions: list[str],
    device: torch.device,
    batch: int,
    keep_tokens: bool,
) -> Encoded:
    feats: list[Tensor] = []
    tokens: list[Tensor] = []
    masks: list[Tensor] = []
    for start in range(0, len(captions), batch):
        ids = tokenizer(captions[start : start + batch]).to(device)  # (B, L)
        if keep_tokens:
            pooled, tok = encode_text_tokens(clip, ids)  # (B, D), (B, L, Wt)
            tokens.append(tok)
            masks.append(text_mask(clip, ids))
        else:
            pooled = clip.encode_text(ids)  # (B, D)
        feats.append(F.normalize(pooled.float(), dim=-1))
    if not keep_tokens:
        return Encoded(torch.cat(feats), None)
    return Encoded(torch.cat(feats), torch.cat(tokens), torch.cat(masks))


class PairScorer:
    """ITM match probability of (text, image) index pairs, each pair computed once per evaluation.

    The i2t and t2i re-ranking lists and the binding truths overlap (mutual nearest neighbours of a trained
    model), and a fusion pass is the expensive part of an eval, so scores are remembered by pair.
    """

    def __init__(self, model: AlbefModel, texts: Encoded, images: Encoded, batch: int) -> None:
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
            probs = itm_match_prob(
                self.model,
                tokens,
                mask[:, :length],
                self.images.tokens[images],
                index,
                self.images.feat[images],
            )
            out.append(probs.float().cpu())
        return torch.cat(out)[by_length.argsort()]  # (P,) back in the order asked for


def binding_scores(
    itm: PairScorer,
    texts: Encoded,
    images: Encoded,
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

"""The refinement stage's cache: the frozen towers' outputs for a random subset of the training images, each with
one of its captions, so that a refinement step is only a fusion pass (train/refine.py)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from retrieval.data.grouping import normalize_caption
from retrieval.data.recolour import draw_permutations, recolour, swap_words
from retrieval.losses.distill import match_belief
from retrieval.models.albef import AlbefModel, encode_image_tokens, encode_text_tokens, trimmed_length
from retrieval.models.encoders import normalize
from retrieval.models.towers import text_mask
from retrieval.progress import progress_bar
from retrieval.train.config import TrainConfig
from retrieval.train.data import TrainData
from retrieval.train.negatives import binding_candidates
from retrieval.train.twins import directional, mirror, mirror_pixels, opposite_caption

_CHUNK = 256  # images or texts per tower pass while filling the cache


class RefineCache:
    """The frozen towers' outputs for a random subset of the training images, each with one of its captions: each
    image's pooled feature and token states; each distinct caption's feature and token states, and the token states
    of its opposite-relation twin (with `relations`) and of its other rule-made false versions (those the training
    vocabulary allows)."""

    def __init__(
        self,
        model: AlbefModel,
        data: TrainData,
        cfg: TrainConfig,
        device: torch.device,
        preprocess: dict[str, Any],
        relations: bool,
        vertical: bool,
        progress: bool = False,
        teacher: AlbefModel | None = None,
    ) -> None:
        rc = cfg.refine
        vocabulary = data.vocabulary  # None without objectives.text_negatives: no rule-made caption then
        valid = data.images.valid.nonzero().flatten()  # (N_valid,)
        g = torch.Generator().manual_seed(cfg.seed + 101)
        order = valid[torch.randperm(len(valid), generator=g)]  # (N_valid,)
        chosen = data.pick_captions(order, cfg.seed + 109)  # (N_valid,) one caption of each image
        image_bytes, text_bytes = _state_bytes(model, data, device)
        slot_of: dict[str, int] = {}
        captions: list[str] = []
        twins: list[str | None] = []
        others: list[list[str]] = []
        rows: list[int] = []
        row_captions: list[str] = []
        row_perms: list[list[int] | None] = []
        g = torch.Generator().manual_seed(cfg.seed + 113)
        recoloured = draw_permutations(len(order), data.recolour_prob, g, data.colours or None)  # per row
        used = 0.0
        for i, c, perm in zip(order.tolist(), chosen.tolist(), recoloured, strict=True):  # until max_pairs or
            # the memory budget
            if len(rows) >= rc.max_pairs:
                break
            caption = data.captions[c] if perm is None else swap_words(data.captions[c], perm)
            cost = image_bytes
            if caption not in slot_of and vocabulary is None:
                twin, found = None, []
            elif caption not in slot_of:
                twin = opposite_caption(caption, vertical) if relations else None
                twin = twin if twin is not None and vocabulary.allows(twin) else None
                found = [
                    c for c in binding_candidates(caption, vocabulary.substitutes) if vocabulary.allows(c)
                ]
                cost += (2 + len(found)) * text_bytes
            if rows and used + cost > rc.max_cache_gb * 1e9:
                break
            if caption not in slot_of:
                slot_of[caption] = len(captions)
                captions.append(caption)
                twins.append(twin)
                others.append(found)
            used += cost
            rows.append(i)
            row_captions.append(caption)
            row_perms.append(perm)
        self.vertical = vertical
        u = len(captions)
        texts = captions + [t for t in twins if t is not None] + [c for found in others for c in found]
        has_twin = torch.tensor([t is not None for t in twins])
        self.twin = torch.full((u,), -1, dtype=torch.long)  # (U,) text row of each caption's twin, -1: none
        self.twin[has_twin] = u + torch.arange(int(has_twin.sum()))
        self.count = torch.tensor([len(f) for f in others], dtype=torch.long)  # (U,) other false versions
        # (U,) whether the twin is also the caption of the image's mirror twin: (twin, mirror) is a true pair
        self.square = torch.tensor(
            [
                t is not None and normalize_caption(mirror(c, vertical)[0]) == t
                for c, t in zip(captions, twins, strict=True)
            ],
            dtype=torch.bool,
        )
        self.start = (
            u + int(has_twin.sum()) + torch.cumsum(self.count, 0) - self.count
        )  # (U,) first one's row
        slots = torch.tensor([slot_of[c] for c in row_captions], dtype=torch.long)
        self._perms = row_perms  # a row's recolouring (data/recolour.py), None: the image as it is
        with torch.no_grad():
            self._images(
                model,
                data,
                torch.tensor(rows, dtype=torch.long),
                slots,
                preprocess,
                device,
                progress,
                teacher,
            )
            self.row_captions = [row_captions[k] for k in self._kept.tolist()]
            self.mirror = torch.full(
                (len(self.index),), -1, dtype=torch.long
            )  # (n,) row in mirror_tokens, -1: none
            self.mirror_tokens = self.image_tokens[:0]
            self.mirror_feat = self.image_feat[:0]  # (m, D) their pooled features
            if relations and rc.mirror_weight > 0:
                self._mirrors(model, data, preprocess, device)
            self._texts(model, data.tokenizer, texts, u, device, progress, teacher)
        # (n, k) for each row, the k other rows whose images the contrastive model ranks highest for its
        # caption (a different caption: a confuser, not a positive); -1 pads; None when neighbour_share is 0
        self.confusers = (
            confusers(self.image_feat, self.text_feat[self.caption_slot], self.caption_slot, rc.neighbours)
            if rc.neighbour_share > 0
            else None
        )
        # (n,) how likely each cached pair is drawn: the teacher's belief that it matches, or None (uniform)
        self.weight: Tensor | None = None
        if teacher is not None:
            self.weight = match_belief(
                self._teacher_image,
                self._teacher_text,
                self.caption_slot.to(self._teacher_image.device),
                float(teacher.logit_scale.exp()),
                rc.batch_size - 1,
                torch.Generator().manual_seed(cfg.seed + 103),
            ).cpu()
            del self._teacher_image, self._teacher_text

    def _images(
        self, model, data, rows: Tensor, slots: Tensor, preprocess, device, progress, teacher
    ) -> None:
        feats, states, kept, taught = [], [], [], []
        bar = progress_bar(desc="refine: images", unit="img", enabled=progress, total=len(rows))
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start : start + _CHUNK]
            pixels = [data.images[int(i)] for i in chunk]
            ok = [k for k, p in enumerate(pixels) if p is not None]  # streamed images may fail to decode
            if ok:
                perms = [self._perms[start + k] for k in ok]
                x = normalize(
                    recolour(torch.stack([pixels[k] for k in ok]), perms),
                    preprocess["mean"],
                    preprocess["std"],
                    device,
                )
                feat, tokens = encode_image_tokens(model.clip, x)  # (b, D), (b, T, Wv)
                feats.append(F.normalize(feat.float(), dim=-1))
                states.append(tokens)
                if teacher is not None:
                    taught.append(
                        F.normalize(encode_image_tokens(teacher.clip, x)[0].float(), dim=-1)
                    )  # (b, D)
                kept.append(start + torch.tensor(ok, dtype=torch.long))
            bar.update(len(chunk))
        bar.close()
        if not kept:
            raise ValueError("refine: no training image could be decoded")
        keep = torch.cat(kept)  # (n,) positions in rows
        self._kept = keep
        self.index = rows[keep]  # (n,) dataset rows
        self.caption_slot = slots[keep]  # (n,) rows of the caption table
        self.image_feat = torch.cat(feats)  # (n, D)
        self.image_tokens = torch.cat(states)  # (n, T, Wv)
        if teacher is not None:
            self._teacher_image = torch.cat(taught)  # (n, D)

    def _mirrors(self, model, data, preprocess, device) -> None:
        """Pooled features and token states of the mirror twin (train/twins.py) of every cached image whose caption
        names a direction: the same scene with the relation reversed, an image-side false match for that caption."""
        feats: list[Tensor] = []
        states: list[Tensor] = []
        todo = [k for k, c in enumerate(self.row_captions) if directional(c, self.vertical)]
        done = 0
        for start in range(0, len(todo), _CHUNK):
            chunk, pixels = [], []
            for k in todo[start : start + _CHUNK]:
                image = data.images[int(self.index[k])]  # a streamed image is decoded again, and may fail
                if image is not None:
                    _, h, v = mirror(self.row_captions[k], self.vertical)
                    image = recolour(image[None], [self._perms[int(self._kept[k])]])[0]
                    pixels.append(mirror_pixels(image, h, v))
                    chunk.append(k)
            if not chunk:
                continue
            x = normalize(torch.stack(pixels), preprocess["mean"], preprocess["std"], device)
            feat, tokens = encode_image_tokens(model.clip, x)  # (b, D), (b, T, Wv)
            feats.append(F.normalize(feat.float(), dim=-1))
            states.append(tokens)
            self.mirror[torch.tensor(chunk)] = done + torch.arange(len(chunk))
            done += len(chunk)
        if states:
            self.mirror_tokens = torch.cat(states)  # (m, T, Wv)
            self.mirror_feat = torch.cat(feats)  # (m, D)

    def _texts(self, model, tokenizer, texts: list[str], n_captions: int, device, progress, teacher) -> None:
        tokens = tokenizer(texts)  # (M, L)
        tokens = tokens[:, : trimmed_length(model.clip, tokens)]  # (M, L'): one length for all rows
        feats, states = [], []
        bar = progress_bar(desc="refine: texts", unit="text", enabled=progress, total=len(texts))
        for start in range(0, len(texts), _CHUNK):
            feat, state = encode_text_tokens(model.clip, tokens[start : start + _CHUNK].to(device))
            feats.append(F.normalize(feat[: max(0, n_captions - start)].float(), dim=-1))
            states.append(state)
            bar.update(len(state))
        bar.close()
        self.text_feat = torch.cat(feats)  # (U, D) the true captions' features
        self.text_tokens = torch.cat(states)  # (M, L', Wt)
        self.text_mask = text_mask(model.clip, tokens).to(device)  # (M, L'): the tokenizer's own pad id
        if teacher is not None:
            captions = tokens[:n_captions]  # (U, L')
            self._teacher_text = torch.cat(
                [
                    F.normalize(
                        encode_text_tokens(teacher.clip, captions[i : i + _CHUNK].to(device))[0].float(),
                        dim=-1,
                    )
                    for i in range(0, n_captions, _CHUNK)
                ]
            )  # (U, D)

    def __len__(self) -> int:
        return len(self.index)


def confusers(
    image_feat: Tensor, text_feat: Tensor, slot: Tensor, k: int, chunk: int = 1024
) -> Tensor | None:
    """(n, k) for row r, the k rows whose images score highest for row r's caption (image_feat (n, D), text_feat
    (n, D) row r's caption) among rows with another caption (slot (n,)); -1 where fewer exist. None for k=0."""
    if k <= 0 or len(slot) < 2:
        return None
    k = min(k, len(slot) - 1)
    out = []
    for s in range(0, len(slot), chunk):
        sim = text_feat[s : s + chunk] @ image_feat.T  # (c, n)
        same = slot[s : s + chunk, None] == slot[None, :]  # (c, n) positives, the row itself included
        sim = sim.masked_fill(same, float("-inf"))
        top = sim.topk(k, dim=1)  # (c, k)
        out.append(torch.where(torch.isfinite(top.values), top.indices, -1))
    return torch.cat(out)  # (n, k)


def _state_bytes(model: AlbefModel, data: TrainData, device: torch.device) -> tuple[int, int]:
    """Bytes cached per image (token states + pooled feature) and per text (token states at full context)."""
    size = data.images.size
    with torch.no_grad():
        feat, tokens = encode_image_tokens(model.clip, torch.zeros(1, 3, size, size, device=device))
    per_text = int(data.tokens.shape[1]) * model.fusion_cfg.text_width * tokens.element_size()
    return tokens[0].numel() * tokens.element_size() + feat.numel() * 4, per_text

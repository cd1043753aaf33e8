"""ITM refinement: a short fusion-only stage after the joint run, the towers frozen and their outputs cached.

Why a stage of its own: in the joint run the fusion encoder learns what the towers already tell apart (other
objects, other colours) and stays at chance on what needs a skill of its own, the direction of a relation ("a red
circle to the left of a blue square" vs "... to the right of ..."): on synth scenes a default run's ITM preferred
the true caption over its opposite-relation twin 0.51 of the time, and 107 of the 238 top-1 misses of text-to-image
retrieval were that twin. Learning it is a slow escape from a saddle (a product of "which object is where" and
"which word was said") that needs a few hundred steps of a concentrated signal and stalls when that signal is one
ITM negative among many; with frozen towers a step is only a fusion pass over cached token states, so the stage
affords those steps. Each step takes B cached images with their captions and scores, by ITM:

- the positives and the negatives `itm_forward` mines in the batch from the frozen contrastive similarities
  (cross-entropy, as in the joint run, so the head stays calibrated for re-ranking);
- each caption's relation replaced by its opposite (`negatives.relation_opposite`), ranked below the true caption
  (`matching.pairwise_rank_loss`) with a large weight;
- one other rule-made false caption (attributes or head nouns swapped; `negatives.binding_candidates`), ranked
  the same way with a small weight, so that attribute binding is kept while the direction is learned;
- the caption's image ranked above its mirror twin (train/twins.py: flipped, so the relation points the other way)
  for that caption, with a large weight: the image-side contrast that ordering images for one caption needs;
- the square's other corner: the mirror twin with the opposite-relation caption is a true pair (both directions
  reversed), ranked above the mirror with the caption and above the image with the twin (refine.square_weight).
  One more fusion row per image doubles the direction's signal: on the same frozen towers (synth seed 1) the
  training direction accuracy was 0.97 after 300 steps with it and 0.58 without (0.94 at 900), and after 1,000
  steps re-ranking lifted t2i R@1 from 0.577 to 0.789 (0.628 without), binding 0.911 (0.868).

Without the mirror term the stage learned to order captions for an image but not images for a caption: after 600
joint steps + 450 here, binding 0.817 -> 0.913 while ITM re-ranking of the top 16 fell from 0.543 to 0.420 t2i
R@1 (the ranked captions leave ITM's per-image offsets free), and ranking the caption's image over another image
captioned with the twin (a different scene, not a mirror) kept the direction at chance for 650 steps. With the
mirror the two differ in nothing but the direction. Measured (synth scenes, 720 joint steps, 1,000-image held-out
gallery): the training accuracy on mirrors leads (0.80 after 430 steps, relations 0.64), both leave the saddle
between 450 and 700 steps and pass 0.97 by 950; after 1500 steps held-out ITM prefers the truth over the reversed
relation 0.977 of the time (0.512 before), colour swaps 0.985 (0.902), shape swaps 0.717 (0.830), and ITM
re-ranking lifts t2i R@1 from 0.578 (contrastive) to 0.655 (0.536 before the stage); binding 0.817 -> 0.911.
At 450 steps the same stage had not left the saddle (held-out reversed 0.64, re-ranked 0.418). Only the fusion
encoder changes; ITC retrieval (the towers) is untouched.

The stage starts from a freshly initialised fusion encoder (refine.reset_fusion). The joint run's fusion has
settled on what the towers tell apart, and from it the saddle was left late or not at all: on synth seed 1 the
training direction accuracy was still 0.65 after 1,500 steps (held-out binding 0.80, re-ranking below the
contrastive order), while a fresh one, on the same towers, left it after ~800 (binding 0.904, re-ranked t2i R@1
0.587 against 0.537). A fresh fusion re-learns attribute matching from the frozen towers within ~200 steps.

The towers the stage starts from come from a joint run without ITM by default (objectives.joint_itm): since
the fusion is started afresh here, the joint run's fusion pass only shaped the towers, at ~30% of a joint step.

Noisy captions. Every term above takes a pair's caption at its word, and a caption written for another image
is trained as a match and teaches the direction at random. With momentum distillation the stage has a teacher: it draws
its pairs in proportion to the momentum model's belief that they match (`losses.distill.match_belief`, ALBEF's
soft ITC targets against batch_size - 1 random others; refine.teacher_sampling): on synth scenes with 30% of the
captions swapped it separated swapped from true pairs with AUC 0.992 (swapped ones were 3% of the draws), and the
same distilled towers refined to binding 0.867 and re-ranked t2i R@1 0.432, against 0.803 and 0.295 drawing
uniformly. Without distillation pairs are drawn uniformly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from retrieval.losses.distill import match_belief
from retrieval.losses.mining import same_id_mask
from retrieval.models.albef import AlbefModel, encode_image_tokens, encode_text_tokens, trimmed_length
from retrieval.models.fusion import itm_forward
from retrieval.models.towers import text_mask
from retrieval.train.config import TrainConfig
from retrieval.train.data import TrainData, normalize
from retrieval.train.negatives import binding_candidates, relation_opposite
from retrieval.train.optim import fused_adamw
from retrieval.train.twins import directional, mirror, mirror_pixels

_CHUNK = 256  # images or texts per tower pass while filling the cache


class RefineCache:
    """The frozen towers' outputs for a random subset of the training pairs: each image's pooled feature and
    token states; each distinct caption's feature and token states, and the token states of its opposite-relation
    twin and of its other rule-made false versions (those the training vocabulary allows)."""

    def __init__(
        self,
        model: AlbefModel,
        data: TrainData,
        cfg: TrainConfig,
        device: torch.device,
        preprocess: dict[str, Any],
        progress: bool = False,
        teacher: AlbefModel | None = None,
    ) -> None:
        rc = cfg.refine
        # built by TrainData with objectives.text_negatives; without them (random negatives) no rule-made caption
        vocabulary = data.vocabulary
        valid = data.images.valid.nonzero().flatten()  # (N_valid,)
        g = torch.Generator().manual_seed(cfg.seed + 101)
        order = valid[torch.randperm(len(valid), generator=g)]  # (N_valid,)
        image_bytes, text_bytes = _state_bytes(model, data, device)
        slot_of: dict[str, int] = {}
        captions: list[str] = []
        twins: list[str | None] = []
        others: list[list[str]] = []
        rows: list[int] = []
        used = 0.0
        for i in order.tolist():  # pairs in random order until max_pairs or the memory budget
            if len(rows) >= rc.max_pairs:
                break
            caption = data.captions[i]
            cost = image_bytes
            if caption not in slot_of and vocabulary is None:
                twin, found = None, []
            elif caption not in slot_of:
                twin = relation_opposite(caption)
                twin = twin if twin is not None and vocabulary.allows(twin) else None
                found = [c for c in binding_candidates(caption) if vocabulary.allows(c)]
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
        u = len(captions)
        texts = captions + [t for t in twins if t is not None] + [c for found in others for c in found]
        has_twin = torch.tensor([t is not None for t in twins])
        self.twin = torch.full((u,), -1, dtype=torch.long)  # (U,) text row of each caption's twin, -1: none
        self.twin[has_twin] = u + torch.arange(int(has_twin.sum()))
        self.count = torch.tensor([len(f) for f in others], dtype=torch.long)  # (U,) other false versions
        # (U,) whether the twin is also the caption of the image's mirror twin: (twin, mirror) is a true pair
        self.square = torch.tensor(
            [
                t is not None and _words(mirror(c, cfg.twins_vertical)[0]) == t
                for c, t in zip(captions, twins, strict=True)
            ],
            dtype=torch.bool,
        )
        self.start = (
            u + int(has_twin.sum()) + torch.cumsum(self.count, 0) - self.count
        )  # (U,) first one's row
        slots = torch.tensor([slot_of[data.captions[i]] for i in rows], dtype=torch.long)
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
            if rc.mirror_weight > 0:
                self._mirrors(model, data, cfg.twins_vertical, preprocess, device)
            self._texts(model, data.tokenizer, texts, u, device, progress, teacher)
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
        bar = tqdm(total=len(rows), desc="refine: images", unit="img", file=sys.stderr, disable=not progress)
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start : start + _CHUNK]
            pixels = [data.images[int(i)] for i in chunk]
            ok = [k for k, p in enumerate(pixels) if p is not None]  # streamed images may fail to decode
            if ok:
                x = normalize(
                    torch.stack([pixels[k] for k in ok]), preprocess["mean"], preprocess["std"], device
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
        self.index = rows[keep]  # (n,) dataset rows
        self.caption_slot = slots[keep]  # (n,) rows of the caption table
        self.image_feat = torch.cat(feats)  # (n, D)
        self.image_tokens = torch.cat(states)  # (n, T, Wv)
        if teacher is not None:
            self._teacher_image = torch.cat(taught)  # (n, D)

    def _mirrors(self, model, data, vertical: bool, preprocess, device) -> None:
        """Token states of the mirror twin (train/twins.py) of every cached image whose caption names a
        direction: the same scene with the relation reversed, an image-side false match for that caption."""
        # (n,) each cached image's row in mirror_tokens, -1: none
        self.mirror = torch.full((len(self.index),), -1, dtype=torch.long)
        states: list[Tensor] = []
        todo = [k for k, i in enumerate(self.index.tolist()) if directional(data.captions[i], vertical)]
        done = 0
        for start in range(0, len(todo), _CHUNK):
            chunk, pixels = [], []
            for k in todo[start : start + _CHUNK]:
                i = int(self.index[k])
                image = data.images[i]  # a streamed image is decoded again, and may fail this time
                if image is not None:
                    _, h, v = mirror(data.captions[i], vertical)
                    pixels.append(mirror_pixels(image, h, v))
                    chunk.append(k)
            if not chunk:
                continue
            x = normalize(torch.stack(pixels), preprocess["mean"], preprocess["std"], device)
            states.append(encode_image_tokens(model.clip, x)[1])  # (b, T, Wv)
            self.mirror[torch.tensor(chunk)] = done + torch.arange(len(chunk))
            done += len(chunk)
        self.mirror_tokens = torch.cat(states) if states else self.image_tokens[:0]  # (m, T, Wv)

    def _texts(self, model, tokenizer, texts: list[str], n_captions: int, device, progress, teacher) -> None:
        tokens = tokenizer(texts)  # (M, L)
        tokens = tokens[:, : trimmed_length(model.clip, tokens)]  # (M, L'): one length for all rows
        feats, states = [], []
        bar = tqdm(total=len(texts), desc="refine: texts", unit="text", file=sys.stderr, disable=not progress)
        for start in range(0, len(texts), _CHUNK):
            feat, state = encode_text_tokens(model.clip, tokens[start : start + _CHUNK].to(device))
            feats.append(F.normalize(feat[: max(0, n_captions - start)].float(), dim=-1))
            states.append(state)
            bar.update(len(state))
        bar.close()
        self.text_feat = torch.cat(feats)  # (U, D) the true captions' features
        self.text_tokens = torch.cat(states)  # (M, L', Wt)
        self.text_mask = text_mask(model.clip, tokens).to(device)  # (M, L')
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


def _words(text: str) -> str:
    return " ".join(text.lower().split())


def _state_bytes(model: AlbefModel, data: TrainData, device: torch.device) -> tuple[int, int]:
    """Bytes cached per image (token states + pooled feature) and per text (token states at full context)."""
    size = data.images.size
    with torch.no_grad():
        feat, tokens = encode_image_tokens(model.clip, torch.zeros(1, 3, size, size, device=device))
    per_text = int(data.tokens.shape[1]) * model.fusion_cfg.text_width * tokens.element_size()
    return tokens[0].numel() * tokens.element_size() + feat.numel() * 4, per_text


def refine_fusion(
    model: AlbefModel,
    data: TrainData,
    cfg: TrainConfig,
    preprocess: dict[str, Any],
    device: torch.device,
    amp: torch.dtype | None,
    log: Callable[[dict[str, Any]], None],
    progress: bool = True,
    teacher: AlbefModel | None = None,
) -> dict[str, float]:
    """cfg.refine.steps fusion-only steps (see the module docstring), logged through `log` every cfg.log_every
    steps as step cfg.steps + k with "stage": "refine". The towers' requires_grad and the model's mode are
    restored afterwards. Returns the last logged window's mean losses."""
    rc = cfg.refine
    towers = [p for p in model.clip.parameters() if p.requires_grad]
    for p in towers:
        p.requires_grad_(False)
    model.eval()
    try:
        cache = RefineCache(model, data, cfg, device, preprocess, progress, teacher)
        if cache.weight is not None and progress:
            w = cache.weight
            print(
                f"refine: pairs drawn by the momentum model's belief that they match (mean {w.mean():.2f}; "
                f"{float((w < 0.1).float().mean()):.0%} of {len(w)} pairs below 0.1)",
                file=sys.stderr,
            )
        fusion = model.fusion
        if rc.reset_fusion:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + 107)
                for m in fusion.modules():
                    reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
                    if reset is not None and m is not fusion:
                        reset()
        fusion.train()
        decay = [p for p in fusion.parameters() if p.ndim >= 2]
        no_decay = [p for p in fusion.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=rc.lr,
            betas=cfg.optim.betas,
            fused=fused_adamw(device),
        )
        scale = model.logit_scale.exp().detach()
        batch = min(rc.batch_size, len(cache))
        weights = {
            "itm": rc.itm_weight,
            "rank_relation": rc.relation_weight,
            "rank_binding": rc.binding_weight,
            "rank_mirror": rc.mirror_weight,
            "rank_square_caption": rc.square_weight,
            "rank_square_image": rc.square_weight,
        }
        bar = tqdm(total=rc.steps, desc="refine ITM", unit="step", file=sys.stderr, disable=not progress)
        window: dict[str, float] = {}
        means: dict[str, float] = {}
        for k in range(1, rc.steps + 1):
            g = torch.Generator().manual_seed((cfg.seed * 100_003 + k) * 1_009 + 53)
            losses = _step(fusion, cache, data, cfg, batch, scale, g, device, amp)
            losses["loss"] = sum(w * losses[name] for name, w in weights.items() if name in losses)
            losses["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            bar.update(1)
            for key, v in losses.items():
                window[key] = window.get(key, 0.0) + float(v.detach())
            if k % cfg.log_every == 0 or k == rc.steps:
                count = cfg.log_every if k % cfg.log_every == 0 else k % cfg.log_every
                means = {key: round(v / count, 5) for key, v in window.items()}
                log({"step": cfg.steps + k, "stage": "refine", **means, "lr": rc.lr})
                bar.set_postfix(
                    itm_acc=f"{means['itm_acc']:.2f}", relation=f"{means.get('rank_relation_acc', 0):.2f}"
                )
                window = {}
        bar.close()
    finally:
        for p in towers:
            p.requires_grad_(True)
        model.train()
    return means


def _step(fusion, cache: RefineCache, data: TrainData, cfg: TrainConfig, batch: int, scale, g, device, amp):
    """One refinement batch's losses: in-batch ITM, and the twins and other false captions ranked."""
    if cache.weight is None:
        pick = torch.randperm(len(cache), generator=g)[:batch]  # (B,) rows of the cache
    else:  # pairs the teacher believes in; the floor keeps B of them drawable
        pick = torch.multinomial(cache.weight + 1e-6, batch, replacement=False, generator=g)  # (B,)
    slots = cache.caption_slot[pick]  # (B,) rows of the caption table
    rows_b = torch.arange(batch)
    twin = cache.twin[slots]  # (B,) -1: no twin
    has_twin = twin >= 0
    count = cache.count[slots]  # (B,)
    has_other = count > 0
    other = cache.start[slots] + (torch.rand(batch, generator=g) * count.clamp(min=1)).long()  # (B,)
    groups = {  # name: (text rows, image of each, owner row); empty groups are left out
        "relation": (twin[has_twin], rows_b[has_twin], rows_b[has_twin]),
        "binding": (other[has_other], rows_b[has_other], rows_b[has_other]),
    }
    image_tokens = cache.image_tokens[pick]  # (B, T, Wv)
    if cfg.refine.mirror_weight > 0:
        twin_image = cache.mirror[pick]  # (B,) -1: no mirror twin
        has_mirror = twin_image >= 0
        mirrors = cache.mirror_tokens[twin_image[has_mirror]]  # (m, T, Wv)
        image_tokens = torch.cat([image_tokens, mirrors])  # (B + m, T, Wv)
        mirrored = batch + torch.arange(int(has_mirror.sum()))  # (m,) their rows in image_tokens
        groups["mirror"] = (slots[has_mirror], mirrored, rows_b[has_mirror])
    scored, compared = {}, {}
    if cfg.refine.mirror_weight > 0 and cfg.refine.square_weight > 0:
        # the mirror with the twin caption is a true pair: it must outscore the mirror with the caption and
        # the image with the twin, the same two contrasts from the other corner of the square
        square = has_mirror & has_twin & cache.square[slots]  # (B,)
        if bool(square.any()):
            at_mirror = (torch.cumsum(has_mirror.long(), 0) - 1)[square]  # (s,) rows of the mirror group
            at_twin = (torch.cumsum(has_twin.long(), 0) - 1)[square]  # (s,) rows of the relation group
            scored["mirror_pair"] = (twin[square], mirrored[at_mirror])  # (text rows, image rows)
            own = torch.arange(int(square.sum()))
            compared = {
                "square_caption": (("mirror_pair", own), ("mirror", at_mirror)),
                "square_image": (("mirror_pair", own), ("relation", at_twin)),
            }
    groups = {name: group for name, group in groups.items() if len(group[0])}
    used = torch.cat([slots, *(r for r, _, _ in groups.values()), *(r for r, _ in scored.values())])
    length = int(cache.text_mask[used].any(dim=0).nonzero().max()) + 1  # longest of this batch's texts

    def texts(r: Tensor) -> tuple[Tensor, Tensor]:
        return cache.text_tokens[r, :length], cache.text_mask[r, :length]

    with torch.no_grad():
        sim = cache.image_feat[pick] @ cache.text_feat[slots].T * scale  # (B, B)
    ids = data.ids[cache.index[pick]].to(device)  # (B,) equal captions are positives of each other
    ranked = {name: (*texts(r), i.to(device), o.to(device)) for name, (r, i, o) in groups.items()}
    pairs = {name: (*texts(r), i.to(device)) for name, (r, i) in scored.items()}
    compared = {
        name: ((true, t.to(device)), (false, f.to(device)))
        for name, ((true, t), (false, f)) in compared.items()
    }
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        return itm_forward(
            fusion,
            *texts(slots),
            image_tokens,
            sim,
            sim.T,
            same_id_mask(ids, ids),
            hard=cfg.objectives.negatives == "hard",
            uniform=cfg.objectives.easy_share,
            generator=g if device.type == "cpu" else None,
            ranked=ranked,
            scored=pairs,
            compared=compared,
        )

"""ITM refinement: a short fusion-only stage after the joint run, the towers frozen and their outputs cached
(train/refine_cache.py). Each step takes B cached images, each with one of its captions, and scores by ITM:

- the positives and the negatives `itm_forward` mines in the batch from the frozen contrastive similarities
  (cross-entropy, as in the joint run, so the head stays calibrated for re-ranking);
- one rule-made false caption (attributes or head nouns swapped; `negatives.binding_candidates`), ranked below the
  true caption (`matching.pairwise_rank_loss`);
- with the relation terms (refine.relation_terms; on when the captions name spatial relations between two
  phrases): the caption's relation reversed (`negatives.relation_opposite`) ranked below the true caption; the
  caption's image ranked above its mirror twin (train/twins.py) for that caption; and the square's other corner,
  the mirror with the reversed caption as a true pair.

Why a stage of its own, what each term buys and what was measured: docs/training.md. Only the fusion encoder
changes; ITC retrieval (the towers) is untouched.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from retrieval.losses.mining import same_id_mask
from retrieval.models.albef import AlbefModel
from retrieval.progress import progress_bar
from retrieval.train.config import RefineConfig, TrainConfig
from retrieval.train.data import TrainData
from retrieval.train.itm import itm_forward
from retrieval.train.negatives import relation_opposite
from retrieval.train.optim import fused_adamw
from retrieval.train.refine_cache import RefineCache
from retrieval.train.twins import VERTICAL, directional

_SAMPLE = 5000  # captions read to decide on the relation terms


def relation_terms(captions: Sequence[str], rc: RefineConfig, seed: int = 0) -> tuple[bool, bool, str]:
    """(relation terms on, vertical mirrors on, why) for refine.relation_terms / vertical_mirrors. auto: on when
    at least rc.relation_share of (a sample of) the captions name a reversible relation between two phrases, or
    name left or right in any wording ("left: a red circle; right: ..."), whose mirror reverses it. Each share is
    measured on its own: photo captions rarely reach either, and their incidental "right hand" or "top of the
    hill" is no such relation."""
    sample = (
        list(captions) if len(captions) <= _SAMPLE else random.Random(seed).sample(list(captions), _SAMPLE)
    )
    phrases = sum(relation_opposite(c) is not None for c in sample) / max(1, len(sample))
    sides = sum(directional(c, vertical=False) for c in sample) / max(1, len(sample))
    if rc.relation_terms == "auto":
        on = max(phrases, sides) >= rc.relation_share
        why = (
            f"auto: {phrases:.0%} of captions name a spatial relation, {sides:.0%} name left or right "
            f"({'>=' if on else 'both <'} {rc.relation_share:.0%})"
        )
    else:
        on, why = rc.relation_terms == "on", f"refine.relation_terms={rc.relation_terms}"
    vertical = on if rc.vertical_mirrors == "auto" else rc.vertical_mirrors == "on"
    vertical = vertical and any(w in c.lower().split() for c in sample for w in VERTICAL)
    return on, vertical, why


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
    relations, vertical, why = relation_terms(data.captions, rc, cfg.seed)
    if progress:
        said = "relation, mirror and square terms " + ("on" if relations else "off")
        print(f"refine: {said} ({why}); vertical mirrors {'on' if vertical else 'off'}", file=sys.stderr)
    terms = {
        "relation_terms": relations,
        "vertical_mirrors": vertical,
        "why": why,
    }  # in the stage's first line
    towers = [p for p in model.clip.parameters() if p.requires_grad]
    for p in towers:
        p.requires_grad_(False)
    model.eval()
    try:
        cache = RefineCache(model, data, cfg, device, preprocess, relations, vertical, progress, teacher)
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
        bar = progress_bar(desc="refine ITM", unit="step", enabled=progress, total=rc.steps)
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
                log({"step": cfg.steps + k, "stage": "refine", **means, "lr": rc.lr, **terms})
                terms = {}
                bar.set_postfix({"itm_acc": f"{means['itm_acc']:.2f}"})
                window = {}
        bar.close()
    finally:
        for p in towers:
            p.requires_grad_(True)
        model.train()
    return means


def _pick(cache: RefineCache, batch: int, share: float, g: torch.Generator) -> Tensor:
    """(B,) distinct cache rows: anchors drawn uniformly (or by the teacher's belief), then, for a `share` of the
    batch, a confuser of an anchor's caption (RefineCache.confusers) not already drawn."""
    n_conf = int(batch * share) if cache.confusers is not None else 0
    if cache.weight is None:
        order = torch.randperm(len(cache), generator=g)  # (n,)
    else:  # pairs the teacher believes in; the floor keeps B of them drawable
        order = torch.multinomial(cache.weight + 1e-6, len(cache), replacement=False, generator=g)  # (n,)
    anchors = order[: batch - n_conf]
    if n_conf == 0:
        return anchors
    taken = set(anchors.tolist())
    extra: list[int] = []
    choice = torch.randint(cache.confusers.shape[1], (len(anchors),), generator=g)  # (A,)
    for a, c in zip(anchors.tolist(), choice.tolist(), strict=True):
        if len(extra) == n_conf:
            break
        row = int(cache.confusers[a, c])
        if row >= 0 and row not in taken:
            taken.add(row)
            extra.append(row)
    fill = [int(r) for r in order[batch - n_conf :] if int(r) not in taken][: n_conf - len(extra)]
    return torch.cat([anchors, torch.tensor(extra + fill, dtype=torch.long)])  # (B,)


def _step(fusion, cache: RefineCache, data: TrainData, cfg: TrainConfig, batch: int, scale, g, device, amp):
    """One refinement batch's losses: in-batch ITM, and the twins and other false captions ranked."""
    pick = _pick(cache, batch, cfg.refine.neighbour_share, g)  # (B,) rows of the cache
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
    reads_pooled = fusion.cfg.global_token
    image_global = cache.image_feat[pick] if reads_pooled else None  # (B, D)
    if cfg.refine.mirror_weight > 0:
        twin_image = cache.mirror[pick]  # (B,) -1: no mirror twin
        has_mirror = twin_image >= 0
        mirrors = cache.mirror_tokens[twin_image[has_mirror]]  # (m, T, Wv)
        image_tokens = torch.cat([image_tokens, mirrors])  # (B + m, T, Wv)
        if reads_pooled:
            image_global = torch.cat([image_global, cache.mirror_feat[twin_image[has_mirror]]])  # (B + m, D)
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
    ids = slots.to(device)  # (B,) one slot per caption text: rows with the same caption are positives
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
            image_global=None if image_global is None else image_global.to(device),
        )

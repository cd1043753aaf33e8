"""The CapFilt filter: a retrieval checkpoint's ITM head scoring (image, caption) pairs, and its threshold,
calibrated on a clean set and recorded in the checkpoint's config.json under "filter".

Why calibrate: the ITM head's probabilities are not calibrated for a noisy set (trained on batches with a fixed
share of negatives, fine-tuned on a small clean set), and 0.5 keeps far too many wrong captions. The threshold
that best separates the clean set's true pairs from the same captions moved onto other images is a measured one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from retrieval.data.grouping import normalize_caption
from retrieval.errors import UserError


class FilterScorer:
    """ITM match probabilities of a checkpoint with a fusion/ITM component."""

    def __init__(self, directory: str, device: torch.device):
        import open_clip

        from retrieval.models.albef import load_albef

        self.model, arch = load_albef(directory)
        self.model.to(device).eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device = device
        size = self.model.clip.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    @torch.inference_mode()
    def score(
        self, pixels: torch.Tensor, captions: Sequence[str], image_index: Sequence[int], batch: int = 256
    ) -> torch.Tensor:
        """pixels (B, 3, S, S) uint8; caption i is scored against image image_index[i]. Returns (n,) floats."""
        from retrieval.models.albef import encode_image_tokens, encode_text_tokens, itm_match_prob, text_mask
        from retrieval.models.encoders import normalize

        pre = self.model.clip.visual.preprocess_cfg
        x = normalize(pixels, pre["mean"], pre["std"], self.device)
        pooled, image_tokens = encode_image_tokens(self.model.clip, x)  # (B, D), (B, N, Wv)
        out = []
        for s in range(0, len(captions), batch):
            ids = self.tokenizer(list(captions[s : s + batch])).to(self.device)  # (n, L)
            _, tokens = encode_text_tokens(self.model.clip, ids, trim=True)  # (n, L', Wt)
            mask = text_mask(self.model.clip, ids[:, : tokens.shape[1]])  # (n, L')
            index = torch.tensor(list(image_index[s : s + batch]), device=self.device)  # (n,)
            out.append(itm_match_prob(self.model, tokens, mask, image_tokens, index, pooled).float().cpu())
        return torch.cat(out) if out else torch.empty(0)


def recorded_threshold(directory: str) -> float | None:
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    value = (config.get("filter") or {}).get("threshold")
    return float(value) if value is not None else None


def best_threshold(positive: torch.Tensor, negative: torch.Tensor) -> tuple[float, dict[str, float]]:
    """The threshold on match probability that maximises balanced accuracy (true pairs kept + wrong pairs
    dropped, each as a share; independent of how noisy the data to filter is), midway between two scores."""
    scores = torch.cat([positive, negative]).sort().values
    cuts = torch.cat([scores[:1] - 1e-6, (scores[1:] + scores[:-1]) / 2, scores[-1:] + 1e-6])
    keep_pos = (positive[None, :] >= cuts[:, None]).float().mean(1)  # (C,)
    drop_neg = (negative[None, :] < cuts[:, None]).float().mean(1)  # (C,)
    best = int(torch.argmax(keep_pos + drop_neg))
    t = float(cuts[best])
    return t, {"true_kept": round(float(keep_pos[best]), 4), "wrong_dropped": round(float(drop_neg[best]), 4)}


def calibrate(
    directory: str, clean_pairs: str, device: torch.device, limit: int = 2000, seed: int = 0, batch: int = 128
) -> dict[str, Any]:
    """Score the clean set's true pairs and its captions shuffled onto other images (never one with the same
    caption), pick best_threshold and record it in the checkpoint's config.json. Returns the "filter" entry."""
    from retrieval.data.grouping import group_pairs
    from retrieval.data.pairs import iter_pairs
    from retrieval.models.checkpoint import _write_json_atomic, read_config
    from retrieval.pipelines.caption import pixels_of

    scorer = FilterScorer(directory, device)
    groups = group_pairs(iter_pairs(clean_pairs))
    n = min(limit, len(groups))
    caps = [groups.captions[groups.captions_of(i)[0]] for i in range(n)]
    rng = random.Random(seed)
    wrong = []
    for i in range(n):  # another image's caption that is not this image's
        for _ in range(100):
            j = rng.randrange(n)
            if normalize_caption(caps[j]) != normalize_caption(caps[i]):
                break
        wrong.append(caps[j])
    pos, neg = [], []
    for s in range(0, n, batch):
        pixels, ok = pixels_of(
            scorer.image_size, [groups.images[i].image for i in range(s, min(n, s + batch))]
        )
        if not ok:
            continue
        idx = [s + j for j in ok]
        scores = scorer.score(
            pixels, [caps[i] for i in idx] + [wrong[i] for i in idx], list(range(len(ok))) * 2
        )
        pos.append(scores[: len(ok)])
        neg.append(scores[len(ok) :])
    if not pos:
        raise UserError(f"{clean_pairs}: no clean image decoded; cannot calibrate the filter")
    threshold, rates = best_threshold(torch.cat(pos), torch.cat(neg))
    entry = {"threshold": round(threshold, 6), "calibrated_on": str(clean_pairs), "pairs": n, **rates}
    config = read_config(directory)
    config["filter"] = entry
    _write_json_atomic(Path(directory) / "config.json", config)
    return entry

"""Training data held in memory: pairs grouped by image -> batches of (uint8 pixels, token ids, positive ids), in a
deterministic, resumable order.

Images are the unit: one decoded copy per image (a 64 px image is 12 KB as uint8), a batch holds distinct images,
each with one of its captions. The order of batches is a pure function of (seed, micro-step, rank), so a resumed run
sees exactly the batches the uninterrupted run would have seen. Datasets bigger than memory stream instead
(train/stream.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from retrieval.data.grouping import ImageGroups, batch_positive_ids, group_pairs
from retrieval.data.images import ImageDecodeError, load_for_model
from retrieval.data.pairs import Pair, PairStats, iter_pairs
from retrieval.data.recolour import colours_named, draw_permutations, recolour, swap_words
from retrieval.errors import UserError
from retrieval.progress import progress_bar
from retrieval.train.negatives import Vocabulary, negative_captions
from retrieval.train.twins import mirror, mirror_pixels


@dataclass
class TrainBatch:
    pixels: torch.Tensor  # (B, 3, S, S) uint8
    tokens: torch.Tensor  # (B, L) long
    ids: torch.Tensor  # (B,) long: positives share an id: rows whose drawn captions are the same text (a
    # batch's images are distinct; grouping.py says why not the transitive image groups)
    negative_tokens: torch.Tensor | None = None  # (B, L): a rule-made false caption per row (negatives.py)
    negative_valid: torch.Tensor | None = None  # (B,) bool: False where no rule applied (the caption repeats)


def load_groups(source: str | os.PathLike, stats: PairStats | None = None) -> ImageGroups:
    groups = group_pairs(iter_pairs(source, stats))
    if not len(groups):
        raise UserError(f"{source}: no usable image-text pairs")
    return groups


class PairImages:
    """Decoded images, one per image (not per caption): cached as one uint8 tensor, or decoded per access."""

    def __init__(
        self, images: list[Pair], image_size: int, cache: bool, max_cache_gb: float, progress: bool = True
    ):
        self.pairs, self.size = images, image_size
        self.failed: dict[str, str] = {}
        self.cache: torch.Tensor | None = None
        need_gb = len(images) * 3 * image_size * image_size / 1e9
        if cache and need_gb <= max_cache_gb:
            self.cache = torch.empty(
                (len(images), 3, image_size, image_size), dtype=torch.uint8
            )  # (N, 3, S, S)
            ok = torch.ones(len(images), dtype=torch.bool)
            for i, pair in enumerate(progress_bar(images, "decoding", "img", progress)):
                pixels = self._decode(pair)
                if pixels is None:
                    ok[i] = False
                else:
                    self.cache[i] = pixels
            self.valid = ok
        else:
            self.valid = torch.ones(len(images), dtype=torch.bool)

    def _decode(self, pair: Pair) -> torch.Tensor | None:
        try:
            pixels, _, _ = load_for_model(pair.image, self.size)
        except ImageDecodeError as e:
            self.failed[pair.key] = str(e)
            return None
        return torch.from_numpy(pixels).permute(2, 0, 1)  # (3, S, S)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        if self.cache is not None:
            return self.cache[i]
        return self._decode(self.pairs[i])


class BatchPlan:
    """Micro-batch m on rank r -> image indices. Each epoch is a fresh permutation of the images seeded by
    (seed, epoch); the last incomplete global batch of an epoch is dropped so every rank has the same number of
    batches. A batch never holds one image twice, so its rows are distinct images."""

    def __init__(self, valid: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.indices = valid.nonzero().flatten()  # (N_valid,)
        self.batch, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.per_epoch = len(self.indices) // (batch_size * world)
        if self.per_epoch == 0:
            raise UserError(
                f"only {len(self.indices)} usable images: fewer than one batch of {batch_size} x {world} "
                "process(es); lower batch_size (--set batch_size=N)"
            )
        self._epoch, self._perm = -1, None

    def step_seed(self, micro_step: int, salt: int = 0) -> int:
        """A seed for the random draws of one micro-batch on this rank: a resumed run redraws the same."""
        return (self.seed * 100_003 + micro_step) * 1_009 + self.rank + salt

    def __call__(self, micro_step: int) -> torch.Tensor:
        epoch, j = divmod(micro_step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, self.indices[torch.randperm(len(self.indices), generator=g)]
        start = (j * self.world + self.rank) * self.batch
        return self._perm[start : start + self.batch]  # (B,)


_SUBSTITUTE_IMAGES = 20_000  # images whose captions teach the word substitutes (negatives.substitutes)


class TrainData:
    """Batches of a plan: each image of the batch with one of its captions, drawn with a generator seeded by
    (seed, micro-step, rank), so over the epochs every caption is seen and a resumed run draws the same. With
    text_negatives, each row also gets a generated false caption, drawn the same way. With recolour_prob > 0, a
    row is recoloured with that probability (data/recolour.py: hues and colour words permuted together); with
    mirror = (p, vertical), a row is mirrored with probability p, its direction words swapped (train/twins.py)."""

    def __init__(
        self,
        groups: ImageGroups,
        images: PairImages,
        tokenizer,
        plan: BatchPlan,
        text_negatives: bool = False,
        recolour_prob: float = 0.0,
        mirror: tuple[float, bool] = (0.0, False),
    ):
        self.groups, self.images, self.plan, self.tokenizer = groups, images, plan, tokenizer
        self.recolour_prob = recolour_prob
        self.mirror_prob, self.mirror_vertical = mirror
        self.captions = groups.captions
        self.colours = colours_named(self.captions) if recolour_prob > 0 else []
        self.tokens = tokenizer(self.captions).to(torch.int32)  # (C, L): half the memory of int64
        self.ids = groups.caption_ids  # (C,) the positive key of a drawn caption
        self.vocabulary = None
        if text_negatives:
            per_image = [
                [self.captions[c] for c in groups.captions_of(i)]
                for i in range(min(len(groups), _SUBSTITUTE_IMAGES))
            ]
            self.vocabulary = Vocabulary(self.captions, per_image)

    def pick_captions(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        """(B,) one caption index for each image index, uniformly among that image's captions."""
        g = torch.Generator().manual_seed(seed)
        start, count = self.groups.offsets[images], self.groups.counts()[images]  # (B,), (B,)
        pick = (torch.rand(len(images), generator=g) * count).long().clamp(max=count - 1)  # (B,)
        return self.groups.order[start + pick]  # (B,)

    def batch(self, micro_step: int) -> TrainBatch:
        idx = self.plan(micro_step)  # (B,) images
        if self.images.cache is not None:
            pixels = self.images.cache[idx]  # (B, 3, S, S)
        else:
            pixels, idx = self._decode(idx, micro_step)
        chosen = self.pick_captions(idx, self.plan.step_seed(micro_step, salt=29))  # (B,) captions
        texts = [self.captions[c] for c in chosen]
        if self.recolour_prob > 0 or self.mirror_prob > 0:
            pixels, texts = self._augment(pixels, texts, micro_step)
            ids = batch_positive_ids([None] * len(texts), texts)  # (B,) distinct images: the same text
            batch = TrainBatch(pixels, self.tokenizer(texts).long(), ids)
        else:
            batch = TrainBatch(pixels, self.tokens[chosen].long(), self.ids[chosen])
        if self.vocabulary is not None:
            seed = self.plan.step_seed(micro_step, salt=7)
            negatives, valid = negative_captions(texts, seed, self.vocabulary)
            batch.negative_tokens = self.tokenizer(negatives)  # (B, L)
            batch.negative_valid = torch.tensor(valid)  # (B,)
        return batch

    def _augment(
        self, pixels: torch.Tensor, texts: list[str], micro_step: int
    ) -> tuple[torch.Tensor, list[str]]:
        """Recolour and mirror rows (each drawn with its own seeded generator), captions changed to match."""
        if self.recolour_prob > 0:
            g = torch.Generator().manual_seed(self.plan.step_seed(micro_step, salt=37))
            perms = draw_permutations(len(texts), self.recolour_prob, g, self.colours)
            pixels = recolour(pixels, perms)
            texts = [t if perm is None else swap_words(t, perm) for t, perm in zip(texts, perms, strict=True)]
        if self.mirror_prob > 0:
            g = torch.Generator().manual_seed(self.plan.step_seed(micro_step, salt=43))
            flips = (torch.rand(len(texts), generator=g) < self.mirror_prob).tolist()
            rows = []
            for i, flip in enumerate(flips):
                if flip:
                    texts[i], flip_h, flip_v = mirror(texts[i], self.mirror_vertical)
                    rows.append(mirror_pixels(pixels[i], flip_h, flip_v))
                else:
                    rows.append(pixels[i])
            pixels = torch.stack(rows)  # (B, 3, S, S)
        return pixels, texts

    def _decode(self, idx: torch.Tensor, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode a batch from disk; an image that fails is replaced by another, drawn with a seeded generator,
        so every batch (on every rank) keeps its shape and no rank waits on a short one."""
        g = torch.Generator().manual_seed(self.plan.step_seed(micro_step, salt=31))
        pool = self.plan.indices
        pixels, kept = [], []
        for i in idx.tolist():
            for _ in range(100):
                image = self.images[i]
                if image is not None:
                    break
                i = int(pool[torch.randint(len(pool), (1,), generator=g)])
            else:
                raise UserError("100 images in a row failed to decode; check the data")
            pixels.append(image)
            kept.append(i)
        return torch.stack(pixels), torch.tensor(kept)  # (B, 3, S, S), (B,)

    def batches(self, start: int) -> Iterator[TrainBatch]:
        """Micro-batches from micro-step `start` on, without end."""
        m = start
        while True:
            yield self.batch(m)
            m += 1

    def state(self) -> dict:
        return {}  # the order is a function of the step: nothing to save

    def restore(self, state: dict) -> None:
        pass

    def refine_set(self) -> TrainData:
        """What the ITM refinement stage caches from: all of it (the stage samples max_pairs images)."""
        return self


def describe_skips(stats: PairStats, images: PairImages) -> str:
    skipped = dict(stats.skipped)
    if images.failed:
        skipped["undecodable image"] = len(images.failed)
    if not skipped:
        return "no pairs skipped"
    return "skipped " + ", ".join(f"{n} {reason}" for reason, n in skipped.items())

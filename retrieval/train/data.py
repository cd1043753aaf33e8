"""Training data: pairs -> (uint8 pixels, token ids, caption ids), and a deterministic, resumable batch order.

Small datasets are decoded once and kept in memory as uint8 (a 64 px image is 12 KB); bigger ones stream from disk
through DataLoader workers. Either way the order of batches is a pure function of (seed, micro-step, rank), so a
resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from retrieval.data.images import ImageDecodeError, load_for_model
from retrieval.data.pairs import Pair, PairStats, iter_pairs
from retrieval.errors import UserError
from retrieval.train.negatives import Vocabulary, negative_captions
from retrieval.train.neighbours import caption_ids
from retrieval.train.twins import caption_id, choose_sources, mirror, mirror_pixels


@dataclass
class TrainBatch:
    pixels: torch.Tensor  # (B, 3, S, S) uint8
    tokens: torch.Tensor  # (B, L) long
    caption_ids: (
        torch.Tensor
    )  # (B,) long: equal captions share an id, so they count as positives of each other
    negative_tokens: torch.Tensor | None = (
        None  # (B, L) long: a generated false caption per row (negatives.py)
    )
    negative_valid: torch.Tensor | None = (
        None  # (B,) bool: False where no rule applied (the row repeats its caption)
    )


def load_pairs(source: str | os.PathLike, stats: PairStats | None = None) -> list[Pair]:
    pairs = list(iter_pairs(source, stats))
    if not pairs:
        raise UserError(f"{source}: no usable image-text pairs")
    return pairs


class PairImages:
    """Decoded images of a list of pairs, cached as one uint8 tensor, or decoded per access."""

    def __init__(
        self, pairs: list[Pair], image_size: int, cache: bool, max_cache_gb: float, progress: bool = True
    ):
        self.pairs, self.size = pairs, image_size
        self.failed: dict[str, str] = {}
        self.cache: torch.Tensor | None = None
        need_gb = len(pairs) * 3 * image_size * image_size / 1e9
        if cache and need_gb <= max_cache_gb:
            self.cache = torch.empty(
                (len(pairs), 3, image_size, image_size), dtype=torch.uint8
            )  # (N, 3, S, S)
            ok = torch.ones(len(pairs), dtype=torch.bool)
            bar = tqdm(pairs, desc="decoding", unit="img", file=sys.stderr, disable=not progress, leave=False)
            for i, pair in enumerate(bar):
                pixels = self._decode(pair)
                if pixels is None:
                    ok[i] = False
                else:
                    self.cache[i] = pixels
            self.valid = ok
        else:
            self.valid = torch.ones(len(pairs), dtype=torch.bool)

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
    """Micro-batch m on rank r -> dataset indices. Each epoch is a fresh permutation seeded by (seed, epoch);
    the last incomplete global batch of an epoch is dropped so every rank has the same number of batches.

    With `neighbours` (N, k) and mix > 0, only batch - round(mix * batch) indices come from the permutation;
    the first round(mix * batch) of them each bring one of their caption neighbours, drawn with a generator
    seeded by (seed, m, rank). An epoch then walks the permutation once, in more (harder) batches.
    """

    def __init__(
        self,
        valid: torch.Tensor,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        neighbours: torch.Tensor | None = None,
        mix: float = 0.0,
    ):
        self.indices = valid.nonzero().flatten()  # (N_valid,)
        self.batch, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.n_near = round(mix * batch_size) if neighbours is not None else 0
        self.n_seed = batch_size - self.n_near
        self.valid = valid
        if neighbours is not None:
            self.set_neighbours(neighbours)
        self.per_epoch = len(self.indices) // (self.n_seed * world)
        if self.per_epoch == 0:
            raise UserError(
                f"only {len(self.indices)} usable pairs: fewer than one batch of {batch_size} x {world} process(es);"
                " lower batch_size (--set batch_size=N)"
            )
        self._epoch, self._perm = -1, None

    def set_neighbours(self, neighbours: torch.Tensor) -> None:
        """(N, k) candidate indices, -1 for none (re-mined during training); undecodable ones are dropped."""
        near = neighbours.masked_fill((neighbours < 0) | ~self.valid[neighbours.clamp(min=0)], -1)  # (N, k)
        order = (near < 0).to(torch.int8).argsort(dim=1, stable=True)  # usable ones first, in rank order
        self.neighbours = near.gather(1, order)  # (N, k)

    def step_seed(self, micro_step: int, salt: int = 0) -> int:
        """A seed for the random draws of one micro-batch on this rank: a resumed run redraws the same."""
        return (self.seed * 100_003 + micro_step) * 1_009 + self.rank + salt

    def __call__(self, micro_step: int) -> torch.Tensor:
        epoch, j = divmod(micro_step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, self.indices[torch.randperm(len(self.indices), generator=g)]
        start = (j * self.world + self.rank) * self.n_seed
        seeds = self._perm[start : start + self.n_seed]  # (S,)
        if not self.n_near:
            return seeds
        g = torch.Generator().manual_seed(self.step_seed(micro_step))
        options = self.neighbours[seeds[: self.n_near]]  # (M, k), -1: none
        count = (options >= 0).sum(dim=1)  # (M,) neighbours are packed first, -1s after
        pick = (torch.rand(self.n_near, generator=g) * count.clamp(min=1)).long()  # (M,)
        near = options.gather(1, pick[:, None]).squeeze(1)  # (M,)
        fallback = self.indices[torch.randint(len(self.indices), (self.n_near,), generator=g)]
        near = torch.where(count > 0, near, fallback)  # a caption with no neighbour brings a random pair
        return torch.cat([seeds, near])  # (B,)


class TrainData:
    """Batches of a plan. With text_negatives, each row also gets a generated false caption, drawn with a
    generator seeded by (seed, micro-step, rank): a resumed run draws the same negatives. With twins > 0, that
    many mirror twins of the plan's rows (train/twins.py), chosen with the same kind of seed, end each batch."""

    def __init__(
        self,
        pairs: list[Pair],
        images: PairImages,
        tokenizer,
        plan: BatchPlan,
        text_negatives: bool = False,
        twins: int = 0,
        twins_vertical: bool = True,
    ):
        self.images, self.plan, self.tokenizer = images, plan, tokenizer
        self.captions = [p.caption for p in pairs]
        self.tokens = tokenizer(self.captions)  # (N, L)
        self.ids = caption_ids(self.captions)  # (N,)
        self.vocabulary = Vocabulary(self.captions) if text_negatives else None
        self.twins, self.twins_vertical = twins, twins_vertical
        self.known: dict[str, int] = {}  # normalised caption -> id, for the ids of twin captions
        if twins:
            for caption, i in zip(self.captions, self.ids.tolist(), strict=True):
                self.known.setdefault(" ".join(caption.lower().split()), i)

    def _add_twins(
        self, pixels: torch.Tensor, captions: list[str], micro_step: int
    ) -> tuple[torch.Tensor, list[str]]:
        seed = self.plan.step_seed(micro_step, salt=13)
        sources = choose_sources(captions, self.twins, seed, self.twins_vertical)
        twins = [mirror(captions[i], self.twins_vertical) for i in sources]
        flipped = [mirror_pixels(pixels[i], h, v) for i, (_, h, v) in zip(sources, twins, strict=True)]
        return torch.cat([pixels, torch.stack(flipped)]), captions + [c for c, _, _ in twins]  # (B + T, ...)

    def batch(self, micro_step: int) -> TrainBatch:
        idx = self.plan(micro_step)
        if self.images.cache is not None:
            pixels = self.images.cache[idx]  # (B, 3, S, S)
        else:
            decoded = [(i, self.images[int(i)]) for i in idx]
            keep = [i for i, p in decoded if p is not None]
            if not keep:
                raise UserError("a whole batch of images failed to decode; check the data")
            pixels = torch.stack([p for _, p in decoded if p is not None])
            idx = torch.tensor(keep)
        captions = [self.captions[i] for i in idx]
        if self.twins:
            pixels, captions = self._add_twins(pixels, captions, micro_step)
            n = len(idx)
            tokens = torch.cat([self.tokens[idx], self.tokenizer(captions[n:])])  # (B + T, L)
            ids = torch.cat([self.ids[idx], torch.tensor([caption_id(c, self.known) for c in captions[n:]])])
            batch = TrainBatch(pixels, tokens, ids)
        else:
            batch = TrainBatch(pixels, self.tokens[idx], self.ids[idx])
        if self.vocabulary is not None:
            seed = self.plan.step_seed(micro_step, salt=7)  # not the neighbours' draw
            negatives, valid = negative_captions(captions, seed, self.vocabulary)
            batch.negative_tokens = self.tokenizer(negatives)  # (B, L)
            batch.negative_valid = torch.tensor(valid)  # (B,)
        return batch

    def batches(self, start: int, stop: int) -> Iterator[TrainBatch]:
        for m in range(start, stop):
            yield self.batch(m)


def normalize(
    pixels: torch.Tensor, mean: list[float], std: list[float], device: torch.device
) -> torch.Tensor:
    x = pixels.to(device, non_blocking=True).float().div_(255.0)  # (B, 3, S, S)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


def describe_skips(stats: PairStats, images: PairImages) -> str:
    skipped = dict(stats.skipped)
    if images.failed:
        skipped["undecodable image"] = len(images.failed)
    if not skipped:
        return "no pairs skipped"
    return "skipped " + ", ".join(f"{n} {reason}" for reason, n in skipped.items())


__all__ = ["TrainData", "BatchPlan", "PairImages", "load_pairs", "normalize", "np"]

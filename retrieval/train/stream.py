"""Training data bigger than memory: pairs streamed from WebDataset shards or large tables through DataLoader
workers, memory flat however large the source.

Each (rank, worker) reads its own shards (or, with fewer shards than readers, every n-th row), shuffles them
through a bounded buffer seeded by (seed, epoch, reader), decodes in the worker and yields whole batches of
exactly batch_size decodable images: an image that fails to decode is counted and replaced by the next sample, so
every rank's batches have one shape and no rank waits for another (no DDP hang). The stream never ends: epochs
follow each other, each a new shard order and shuffle.

Exact resume: each batch carries how many samples its reader had consumed; the resume state keeps that count for
every reader and the number of batches taken. A resumed run skips each reader's consumed samples without decoding
them and rotates the readers so the next batch comes from the reader that was next, which yields the batches the
uninterrupted run would have seen.

Positives: two rows are one image when their `image_id` column, else their image bytes (or path), hash alike; two
rows of a batch are positives when they are one image or carry the same caption (grouping.batch_positive_ids, the
rule of in-memory batches too): a caption is never a negative of an image it describes.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from retrieval.data.grouping import batch_positive_ids, group_pairs, hash63, image_key
from retrieval.data.images import ImageDecodeError, load_for_model
from retrieval.data.pairs import Pair, PairStats, _shards, detect_format, iter_pairs
from retrieval.data.recolour import choose, colours_named, draw_permutations, recolour, swap_words
from retrieval.train.config import TrainConfig
from retrieval.train.data import BatchPlan, PairImages, TrainBatch, TrainData
from retrieval.train.negatives import Vocabulary, negative_captions

VOCABULARY_CAPTIONS = 50_000  # captions read at start for the rule-made negatives' vocabulary


def should_stream(source: str, cfg: TrainConfig) -> bool:
    """stream=auto streams WebDataset shards and holds tables and folders in memory."""
    if cfg.stream != "auto":
        return cfg.stream == "stream"
    return detect_format(source) == "tar"


def image_id(image: str | bytes) -> int:
    """A 63-bit id of an image's bytes or path: equal images share it in every process."""
    return hash63(image if isinstance(image, bytes) else os.fsencode(image))


class _Readers(IterableDataset):
    """The samples of one DataLoader worker, as batches; see the module docstring."""

    def __init__(
        self,
        source,
        cfg: TrainConfig,
        tokenizer,
        size: int,
        rank: int,
        world: int,
        vocabulary,
        workers: int,
        rotate: int,
        skip: list[int],
    ):
        super().__init__()
        self.source, self.cfg, self.tokenizer, self.size = source, cfg, tokenizer, size
        self.rank, self.world, self.vocabulary = rank, world, vocabulary
        self.workers, self.rotate, self.skip = max(1, workers), rotate, skip
        self.recolour: tuple[float, list[int]] = (0.0, [])  # (probability, colour bins), set by StreamData

    def _pairs(self, reader: int, readers: int, epoch: int) -> Iterator[Pair]:
        fmt = detect_format(self.source)
        shards = _shards(os.fspath(self.source)) if fmt == "tar" else [self.source]
        random.Random(self.cfg.seed * 7_919 + epoch).shuffle(shards)
        if len(shards) >= readers:
            for shard in shards[reader::readers]:
                yield from iter_pairs(shard)
        else:
            for shard in shards:
                yield from itertools.islice(iter_pairs(shard), reader, None, readers)

    def _shuffled(self, reader: int, readers: int) -> Iterator[Pair]:
        for epoch in itertools.count():
            rng = random.Random((self.cfg.seed * 100_003 + epoch) * 1_009 + reader)
            buffer: list[Pair] = []
            empty = True
            for pair in self._pairs(reader, readers, epoch):
                empty = False
                if len(buffer) < self.cfg.shuffle_buffer:
                    buffer.append(pair)
                    continue
                k = rng.randrange(len(buffer))
                buffer[k], pair = pair, buffer[k]
                yield pair
            rng.shuffle(buffer)
            yield from buffer
            if empty:
                raise RuntimeError(f"{self.source}: reader {reader} of {readers} got no pairs")

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        role = (
            w + self.rotate
        ) % self.workers  # the reader this worker plays (exact resume, module docstring)
        readers = self.world * self.workers
        reader = self.rank * self.workers + role
        consumed, pixels, captions, ids = 0, [], [], []
        step = 0
        for pair in self._shuffled(reader, readers):
            consumed += 1
            if consumed <= self.skip[role]:
                continue
            try:
                array, _, _ = load_for_model(pair.image, self.size)  # (S, S, 3) uint8
            except ImageDecodeError:
                continue
            pixels.append(torch.from_numpy(array).permute(2, 0, 1))  # (3, S, S)
            captions.append(pair.caption)
            key = image_key(pair)
            ids.append(image_id(key.encode() if key.startswith("id:") else pair.image))
            if len(pixels) == self.cfg.batch_size:
                yield self._batch(pixels, captions, ids, reader, consumed, step), role, consumed
                pixels, captions, ids = [], [], []
                step += 1

    def _batch(self, pixels, captions, ids, reader: int, consumed: int, step: int) -> TrainBatch:
        pixels = torch.stack(pixels)  # (B, 3, S, S)
        prob, colours = self.recolour
        if prob > 0:
            g = torch.Generator().manual_seed((self.cfg.seed * 100_003 + consumed) * 1_009 + reader + 37)
            perms = draw_permutations(len(captions), prob, g, colours)
            pixels = recolour(pixels, perms)
            captions = [c if p is None else swap_words(c, p) for c, p in zip(captions, perms, strict=True)]
            # a recoloured row is a new image: positive only to rows with its (new) caption
            ids = [i if p is None else None for i, p in zip(ids, perms, strict=True)]
        batch = TrainBatch(pixels, self.tokenizer(captions), batch_positive_ids(ids, captions))
        if self.vocabulary is not None:
            seed = (self.cfg.seed * 100_003 + consumed) * 1_009 + reader + 7
            negatives, valid = negative_captions(captions, seed, self.vocabulary)
            batch.negative_tokens = self.tokenizer(negatives)  # (B, L)
            batch.negative_valid = torch.tensor(valid)  # (B,)
        return batch


class StreamData:
    """The streaming counterpart of train/data.py's TrainData: batches(start), state(), restore(), refine_set()."""

    def __init__(self, source: str, cfg: TrainConfig, tokenizer, size: int, rank: int = 0, world: int = 1):
        self.source, self.cfg, self.tokenizer, self.size = source, cfg, tokenizer, size
        self.rank, self.world = rank, world
        self.readers = max(1, cfg.workers)
        self.consumed = [0] * self.readers  # samples each reader had consumed at the last batch taken
        self.taken = 0  # batches taken
        self.vocabulary = None
        head: list[str] = []
        per_image: dict[str, list[str]] = {}  # captions only: a shard's image bytes are not kept
        for p in itertools.islice(iter_pairs(source), VOCABULARY_CAPTIONS):
            head.append(p.caption)
            per_image.setdefault(image_key(p), []).append(p.caption)
        if cfg.objectives.text_negatives:
            self.vocabulary = Vocabulary(head, per_image.values())
        prob, self.recolour_why = choose(cfg.recolour, cfg.recolour_prob, head)
        self.recolour = (prob, colours_named(head))

    def describe(self) -> str:
        return (
            f"{self.source} through {self.cfg.workers} worker(s), shuffle buffer {self.cfg.shuffle_buffer}; "
            f"{self.recolour_why}"
            + (f"; {self.vocabulary.describe()}" if self.vocabulary is not None else "")
        )

    def batches(self, start: int) -> Iterator[TrainBatch]:
        rotate = self.taken % self.readers
        dataset = _Readers(
            self.source,
            self.cfg,
            self.tokenizer,
            self.size,
            self.rank,
            self.world,
            self.vocabulary,
            self.readers,
            rotate,
            list(self.consumed),
        )
        dataset.recolour = self.recolour
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.cfg.workers,
            persistent_workers=False,
            prefetch_factor=2 if self.cfg.workers else None,
        )
        for batch, role, consumed in loader:
            self.consumed[role] = consumed
            self.taken += 1
            yield batch

    def state(self) -> dict[str, Any]:
        return {"consumed": torch.tensor(self.consumed), "taken": torch.tensor(self.taken)}

    def restore(self, state: dict[str, Any]) -> None:
        self.consumed = [int(c) for c in state["consumed"]]
        self.taken = int(state["taken"])

    def refine_set(self) -> TrainData:
        """The refinement stage's images: the first refine.max_pairs distinct images of the source with every
        caption of theirs read until then (a shard layout that deals an image's captions out to several shards
        still gives max_pairs images, not max_pairs captions of fewer), held in memory."""
        stats = PairStats()
        limit = self.cfg.refine.max_pairs
        seen: set[str] = set()

        def head():
            for pair in iter_pairs(self.source, stats):
                key = image_key(pair)
                if key not in seen:
                    if len(seen) == limit:
                        return
                    seen.add(key)
                yield pair

        groups = group_pairs(head())
        images = PairImages(groups.images, self.size, True, self.cfg.refine.max_cache_gb * 4, progress=False)
        plan = BatchPlan(
            images.valid, min(self.cfg.refine.batch_size, int(images.valid.sum())), self.cfg.seed
        )
        return TrainData(
            groups, images, self.tokenizer, plan, self.cfg.objectives.text_negatives, self.recolour[0]
        )

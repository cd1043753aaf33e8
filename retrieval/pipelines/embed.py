"""Read -> encode, streaming: DataLoader workers read, hash and decode files while the model encodes the batch before.

Workers ship uint8 pixels (4x less inter-process traffic than float); the encoder normalises on its device.
A file that cannot be read or decoded comes back as a failure with its reason; it never stops the stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from retrieval.data.images import ImageDecodeError, load_for_model
from retrieval.data.scan import FileEntry
from retrieval.models.encoders import Encoder


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class Decoded:
    index: int  # position in the entry list given to the dataset
    pixels: np.ndarray | None  # (S, S, 3) uint8, None on failure
    width: int = 0
    height: int = 0
    hash: str = ""
    error: str = ""


class ImageFiles(Dataset):
    """Files -> Decoded. Reads each file once: the same bytes give the content hash and the pixels."""

    def __init__(self, entries: Sequence[FileEntry], image_size: int, max_pixels: int):
        self.entries = entries
        self.image_size = image_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> Decoded:
        path = self.entries[i].path
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return Decoded(i, None, error=f"unreadable: {e.strerror or e}")
        digest = content_hash(data)
        try:
            pixels, width, height = load_for_model(data, self.image_size, max_pixels=self.max_pixels)
        except ImageDecodeError as e:
            return Decoded(i, None, hash=digest, error=str(e))
        return Decoded(i, pixels, width, height, digest)


@dataclass
class Batch:
    items: list[Decoded]  # the decoded ones, in order; pixels dropped after stacking
    pixels: torch.Tensor | None  # (B, 3, S, S) uint8
    failures: list[Decoded] = field(default_factory=list)


def collate(items: list[Decoded]) -> Batch:
    good = [d for d in items if d.pixels is not None]
    bad = [d for d in items if d.pixels is None]
    pixels = None
    if good:
        pixels = torch.from_numpy(np.stack([d.pixels for d in good])).permute(0, 3, 1, 2)  # (B, 3, S, S)
        for d in good:
            d.pixels = None
    return Batch(good, pixels, bad)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoders must not fight the model's threads for the cores


def decoded_batches(
    entries: Sequence[FileEntry],
    image_size: int,
    batch_size: int,
    workers: int,
    max_pixels: int,
    pin: bool = False,
) -> Iterator[Batch]:
    dataset = ImageFiles(entries, image_size, max_pixels)
    if len(entries) <= batch_size:
        workers = 0  # one batch: starting a decoder process would cost more than it saves
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,  # a few batches ahead absorbs slow files (big JPEGs, NFS)
        pin_memory=pin,
        # not fork: the parent holds LanceDB's async runtime and torch's thread pools, and forking a process
        # with live threads can deadlock the child
        multiprocessing_context="forkserver" if workers else None,
    )
    yield from loader


def embed_batches(
    encoder: Encoder, entries: Sequence[FileEntry], batch_size: int, workers: int, max_pixels: int
) -> Iterator[tuple[Batch, np.ndarray]]:
    """Yields (batch, vectors (len(batch.items), D) float32) in entry order."""
    pin = encoder.device.type == "cuda"
    for batch in decoded_batches(entries, encoder.image_size, batch_size, workers, max_pixels, pin):
        if batch.pixels is None:
            yield batch, np.zeros((0, encoder.embed_dim), np.float32)
            continue
        yield batch, encoder.encode_images(batch.pixels).numpy()

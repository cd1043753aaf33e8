"""Read -> hash -> decode, in worker processes, a bounded number of batches ahead of the model.

No torch here: a decode worker imports numpy and Pillow only (tens of MB and a fraction of a second to start,
against torch's ~700 MB and seconds), and `index` can hash touched files without importing the model's stack.
Workers are spawned children of the command and die with it (lifecycle.die_with_parent), kill -9 included.
A file that cannot be read or decoded comes back as a failure with its reason; it never stops the stream.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from retrieval.data.images import ImageDecodeError, load_for_model
from retrieval.data.scan import FileEntry
from retrieval.lifecycle import children_ignore_sigint, die_with_parent

PREFETCH_BATCHES = 4  # batches decoded ahead of the model: absorbs slow files (big JPEGs, NFS), bounds memory


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class Decoded:
    index: int  # position in the entry list given to decoded_batches
    pixels: np.ndarray | None  # (S, S, 3) uint8, None on failure
    width: int = 0
    height: int = 0
    hash: str = ""
    error: str = ""


@dataclass
class Batch:
    items: list[Decoded]  # the decoded ones, in order; pixels dropped after stacking
    pixels: np.ndarray | None  # (B, S, S, 3) uint8, None when nothing in the batch decoded
    failures: list[Decoded] = field(default_factory=list)


def decode_file(index: int, path: str, image_size: int, max_pixels: int) -> Decoded:
    """Reads the file once: the same bytes give the content hash and the pixels."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return Decoded(index, None, error=f"unreadable: {e.strerror or e}")
    digest = content_hash(data)
    try:
        pixels, width, height = load_for_model(data, image_size, max_pixels=max_pixels)
    except ImageDecodeError as e:
        return Decoded(index, None, hash=digest, error=str(e))
    return Decoded(index, pixels, width, height, digest)


def _decode_chunk(chunk: list[tuple[int, str]], image_size: int, max_pixels: int) -> Batch:
    return collate([decode_file(i, path, image_size, max_pixels) for i, path in chunk])


def collate(items: list[Decoded]) -> Batch:
    good = [d for d in items if d.pixels is not None]
    bad = [d for d in items if d.pixels is None]
    pixels = np.stack([d.pixels for d in good]) if good else None  # (B, S, S, 3)
    for d in good:
        d.pixels = None
    return Batch(good, pixels, bad)


def _worker_init(parent_pid: int) -> None:
    die_with_parent(parent_pid)  # a killed index run must not leave decoders behind


def decoded_batches(
    entries: Sequence[FileEntry], image_size: int, batch_size: int, workers: int, max_pixels: int
) -> Iterator[Batch]:
    """Batches of `batch_size` entries in order. workers=0 decodes in this process. Close the generator (or
    exhaust it) to stop the workers; they also end by themselves when this process dies."""
    chunks = [
        [(i, entries[i].path) for i in range(start, min(start + batch_size, len(entries)))]
        for start in range(0, len(entries), batch_size)
    ]
    if len(chunks) <= 1:
        workers = 0  # one batch: starting a decoder process would cost more than it saves
    if not workers:
        for chunk in chunks:
            yield _decode_chunk(chunk, image_size, max_pixels)
        return
    # spawn: the parent holds LanceDB's async runtime and torch's thread pools, and forking a process with live
    # threads can deadlock the child; and a spawned worker is this process's own child, so the kernel's
    # parent-death signal reaches it (a forkserver's children outlive the command)
    context = multiprocessing.get_context("spawn")
    with children_ignore_sigint():
        pool = context.Pool(workers, initializer=_worker_init, initargs=(os.getpid(),))
    with pool:
        pending: deque = deque()
        todo = iter(chunks)
        for chunk in todo:
            pending.append(pool.apply_async(_decode_chunk, (chunk, image_size, max_pixels)))
            if len(pending) >= PREFETCH_BATCHES + workers:
                break
        while pending:
            batch = pending.popleft().get()
            chunk = next(todo, None)
            if chunk is not None:
                pending.append(pool.apply_async(_decode_chunk, (chunk, image_size, max_pixels)))
            yield batch

"""Read -> encode, streaming: decode workers (pipelines/decode.py) read, hash and decode files while the model
encodes the batch before.

Workers ship uint8 pixels (4x less inter-process traffic than float); the encoder normalises on its device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from retrieval.data.scan import FileEntry
from retrieval.models.encoders import Encoder
from retrieval.pipelines.decode import Batch, decoded_batches


def encode_pixels(encoder: Encoder, pixels: np.ndarray) -> np.ndarray:
    """(B, S, S, 3) uint8 -> (B, D) float32 normalised features."""
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # (B, 3, S, S)
    return encoder.encode_images(images).numpy()


def embed_batches(
    encoder: Encoder, entries: Sequence[FileEntry], batch_size: int, workers: int, max_pixels: int
) -> Iterator[tuple[Batch, np.ndarray]]:
    """Yields (batch, vectors (len(batch.items), D) float32) in entry order."""
    for batch in decoded_batches(entries, encoder.image_size, batch_size, workers, max_pixels):
        if batch.pixels is None:
            yield batch, np.zeros((0, encoder.embed_dim), np.float32)
            continue
        yield batch, encode_pixels(encoder, batch.pixels)

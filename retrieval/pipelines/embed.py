"""Encode decoded batches: decode workers (pipelines/decode.py) ship uint8 pixels (4x less inter-process
traffic than float) while the model encodes the batch before; the encoder normalises on its device."""

from __future__ import annotations

import numpy as np
import torch

from retrieval.models.encoders import Encoder


def encode_pixels(encoder: Encoder, pixels: np.ndarray) -> np.ndarray:
    """(B, S, S, 3) uint8 -> (B, D) float32 normalised features."""
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # (B, 3, S, S)
    if encoder.device.type == "cuda":
        images = images.pin_memory()  # lets the copy to the GPU run asynchronously
    return encoder.encode_images(images).numpy()

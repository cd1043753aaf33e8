"""Captioning images: decode -> normalise -> the captioner's image tokens -> batched generation
(models/generate.py) -> text. Used by `retrieval caption`, `eval --captioner` and the bootstrap."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from retrieval.data.images import ImageDecodeError, load_for_model
from retrieval.data.pairs import Pair
from retrieval.models.captioner import Captioner
from retrieval.models.encoders import normalize
from retrieval.models.generate import GenerateConfig, generate_ids
from retrieval.progress import progress_bar


def image_size(model: Captioner) -> int:
    size = model.clip.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def pixels_of(size: int, sources: Sequence[str | bytes]) -> tuple[torch.Tensor, list[int]]:
    """(B', 3, S, S) uint8 of the images that decode, and the indices of those that do."""
    arrays, ok = [], []
    for i, src in enumerate(sources):
        try:
            arr, _, _ = load_for_model(src, size)
        except ImageDecodeError:
            continue
        arrays.append(torch.from_numpy(arr).permute(2, 0, 1))  # (3, S, S)
        ok.append(i)
    if not arrays:
        return torch.empty(0, 3, size, size, dtype=torch.uint8), ok
    return torch.stack(arrays), ok  # (B', 3, S, S)


@torch.inference_mode()
def caption_pixels(
    model: Captioner, pixels: torch.Tensor, gen: GenerateConfig, device: torch.device, repeat: int = 1
) -> list[str]:
    """Captions for (B, 3, S, S) uint8 images; repeat: each image's tokens are repeated so one batch of
    sampling draws `repeat` captions per image (rows b*repeat ... b*repeat+repeat-1)."""
    pre = model.clip.visual.preprocess_cfg
    x = normalize(pixels, pre["mean"], pre["std"], device)
    tokens = model.image_tokens(x)  # (B, N, Wv)
    if repeat > 1:
        tokens = tokens.repeat_interleave(repeat, 0)  # (B*R, N, Wv)
    return [model.vocab.decode(ids) for ids in generate_ids(model.decoder, tokens, gen)]


@dataclass
class Captioned:
    path: str
    caption: str | None  # None: the image did not decode
    error: str | None = None


def caption_pairs(
    model: Captioner,
    pairs: Sequence[Pair],
    gen: GenerateConfig | None = None,
    device=None,
    batch_size: int = 64,
    progress: bool = False,
) -> list[str]:
    """One caption per pair's image ('' for an image that does not decode)."""
    gen = gen or GenerateConfig()
    device = device or torch.device("cpu")
    model.to(device)
    out = [""] * len(pairs)
    bar = progress_bar(desc="caption", unit="img", enabled=progress, total=len(pairs))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        pixels, ok = pixels_of(image_size(model), [p.image for p in chunk])
        if ok:
            for i, text in zip(ok, caption_pixels(model, pixels, gen, device), strict=True):
                out[start + i] = text
        bar.update(len(chunk))
    bar.close()
    return out


def caption_files(
    model: Captioner,
    paths: Sequence[str | os.PathLike],
    gen: GenerateConfig,
    device,
    batch_size: int = 32,
    progress: bool = True,
) -> list[Captioned]:
    """Caption image files, in order; an undecodable one gets caption None and the reason."""
    model.to(device)
    results: list[Captioned] = []
    bar = progress_bar(desc="caption", unit="img", enabled=progress, total=len(paths))
    for start in range(0, len(paths), batch_size):
        chunk = [str(p) for p in paths[start : start + batch_size]]
        pixels, ok = pixels_of(image_size(model), chunk)
        texts = dict(zip(ok, caption_pixels(model, pixels, gen, device), strict=True)) if ok else {}
        results += [
            Captioned(p, texts.get(i), None if i in texts else "undecodable image")
            for i, p in enumerate(chunk)
        ]
        bar.update(len(chunk))
    bar.close()
    return results

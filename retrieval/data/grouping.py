"""Images, not captions, are the unit: the pairs of one image (same `image_id` column, else same image path or
tar key) grouped together, as COCO and Flickr30k are laid out (five captions per image).

Training counts every caption of an image as its positive and never as a negative; evaluation counts an
image-to-text hit when any of its captions is in the top K. Two different images with the same caption (case and
spacing aside) are positives of each other too: a caption cannot be a negative of an image it describes.

Training keys a batch's positives on the captions drawn (`caption_ids`), not on groups of images joined through
chains of shared captions: in bootstrapped data, where synthetic captions repeat across many images, such chains
joined most of the dataset into one group, so a batch had (almost) no negatives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import torch

from retrieval.data.pairs import Pair

IMAGE_ID_COLUMNS = ("image_id", "img_id")  # the first one present names the image; else its path or tar key


def normalize_caption(text: str) -> str:
    """Case and spacing folded: the form in which two captions are the same caption."""
    return " ".join(text.lower().split())


def image_key(pair: Pair) -> str:
    """Which image a pair shows: its `image_id` column when the row has one, else its path or tar key."""
    for column in IMAGE_ID_COLUMNS:
        value = pair.extra.get(column)
        if value is not None and str(value) != "":
            return f"id:{value}"
    return pair.key


@dataclass
class ImageGroups:
    images: list[Pair]  # the first pair of each image, in first-seen order: where its pixels come from
    captions: list[str]  # every caption, in file order
    caption_image: torch.Tensor  # (C,) long: the image of each caption
    offsets: torch.Tensor  # (I + 1,) long: captions of image i are order[offsets[i]:offsets[i + 1]]
    order: torch.Tensor  # (C,) long: caption indices sorted by image
    caption_ids: torch.Tensor  # (C,) long: one id per distinct normalised caption text

    def __len__(self) -> int:
        return len(self.images)

    def captions_of(self, image: int) -> list[int]:
        return self.order[self.offsets[image] : self.offsets[image + 1]].tolist()

    def counts(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]  # (I,) captions per image


def group_pairs(pairs: Iterable[Pair]) -> ImageGroups:
    """Group pairs by image_key; caption_ids number the distinct normalised caption texts."""
    index: dict[str, int] = {}
    images: list[Pair] = []
    captions: list[str] = []
    owner: list[int] = []
    for pair in pairs:
        i = index.setdefault(image_key(pair), len(images))
        if i == len(images):
            images.append(pair)
        captions.append(pair.caption)
        owner.append(i)
    caption_image = torch.tensor(owner, dtype=torch.long)
    order = torch.argsort(caption_image, stable=True)
    offsets = torch.zeros(len(images) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.bincount(caption_image, minlength=len(images)), 0)
    text_ids: dict[str, int] = {}
    caption_ids = torch.tensor(
        [text_ids.setdefault(normalize_caption(c), len(text_ids)) for c in captions], dtype=torch.long
    )
    return ImageGroups(images, captions, caption_image, offsets, order, caption_ids)


def batch_positive_ids(images: Sequence[Hashable | None], captions: Sequence[str]) -> torch.Tensor:
    """(B,) ids of a batch's positives: rows showing the same image (images[i]; None: an image of its own, such
    as a recoloured copy) or carrying the same caption (case and spacing aside) share one, joined through each
    other within the batch (a batch is small, so such chains stay short). An id is a 63-bit hash of its group's
    first caption, so batches gathered from other ranks or queued from earlier steps agree on equal texts."""
    parent = list(range(len(captions)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, Hashable], int] = {}
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        keys = [("text", normalize_caption(caption))] + ([("image", image)] if image is not None else [])
        for key in keys:
            parent[root(i)] = root(first.setdefault(key, i))
    return torch.tensor([text_id(captions[root(i)]) for i in range(len(captions))], dtype=torch.long)


def hash63(data: bytes) -> int:
    """A 63-bit id of some bytes (an image, a caption), equal in every process."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def text_id(caption: str) -> int:
    """A 63-bit id of a caption (case and spacing aside), equal in every process."""
    return hash63(normalize_caption(caption).encode())

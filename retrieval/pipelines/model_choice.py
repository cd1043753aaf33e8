"""Which encoder a command uses, from the flags it was given and the collection it works on.

index:  --checkpoint DIR wins; with no model flags, an existing collection's own model, else the pretrained
        default (weights.DEFAULT_ARCH / DEFAULT_TAG); --model ARCH alone gets ARCH's published weights, and an
        architecture without any (our presets) must say --pretrained none to be random. Random weights only
        when asked for by name.
search: the collection's own model unless one is named; --pretrained without --model is an error.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from indexes.manifest import read_manifest
from retrieval.config import EncoderConfig
from retrieval.errors import UserError
from retrieval.models.encoders import check_arch
from retrieval.models.weights import DEFAULT_ARCH, DEFAULT_TAG, RANDOM, default_tag


def collection_encoder(db: str | os.PathLike, model: dict, device: str = "auto") -> EncoderConfig:
    """The encoder a collection was built with, rebuilt from its manifest's model entry."""
    source = model.get("source") or {}
    checkpoint = source.get("checkpoint")
    if checkpoint and not os.path.isdir(checkpoint):
        raise UserError(f"{db} was built with checkpoint {checkpoint}, which is gone; pass --checkpoint")
    return EncoderConfig(
        arch=source.get("arch", model["arch"]),
        pretrained=source.get("pretrained", RANDOM),
        checkpoint=checkpoint,
        seed=int(source.get("seed", 0)),
        device=device,
    )


def _own_model(db: str | os.PathLike) -> dict | None:
    manifest = read_manifest(db) if Path(db).is_dir() else None
    return manifest["model"] if manifest else None


def index_encoder(
    db: str | os.PathLike,
    model: str | None,
    pretrained: str | None,
    checkpoint: str | None,
    seed: int | None = None,
    device: str = "auto",
) -> EncoderConfig:
    """The encoder `retrieval index` embeds with (see the module docstring). seed None: the collection's."""
    if checkpoint:
        return EncoderConfig(checkpoint=checkpoint, seed=seed or 0, device=device)
    # a model named in full needs nothing from the collection (whose manifest may be the thing being repaired)
    own = _own_model(db) if model is None or pretrained is None else None
    source = ((own or {}).get("source") or {}) if own else {}
    if model is None and pretrained is None and own is not None:
        cfg = collection_encoder(db, own, device)
        return cfg if seed is None else dataclasses.replace(cfg, seed=seed)
    arch = model or source.get("arch") or DEFAULT_ARCH
    check_arch(arch)
    if pretrained is None:
        if source.get("arch") == arch:
            pretrained = source.get("pretrained", RANDOM)
        else:
            pretrained = DEFAULT_TAG if arch == DEFAULT_ARCH else default_tag(arch)
    if pretrained is None:
        raise UserError(
            f"--model {arch} has no published weights: pass --pretrained none for random weights (to "
            "train or test), --pretrained FILE for local weights, or --checkpoint DIR for a trained model"
        )
    return EncoderConfig(arch=arch, pretrained=pretrained, seed=seed or 0, device=device)


def search_encoder(
    db: str | os.PathLike,
    model: str | None,
    pretrained: str | None,
    checkpoint: str | None,
    seed: int = 0,
    device: str = "auto",
) -> EncoderConfig | None:
    """The encoder `retrieval search` was asked for; None means the collection's own (search.py loads it)."""
    if pretrained is not None and model is None and not checkpoint:
        raise UserError(
            f"--pretrained {pretrained} needs --model ARCH (without either, the collection's own model is used)"
        )
    if checkpoint:
        return EncoderConfig(checkpoint=checkpoint, seed=seed, device=device)
    if model is None:
        return None
    if pretrained is None:  # the collection's weights for that architecture, else that architecture's default
        own = _own_model(db)
        source = (own or {}).get("source") or {}
        pretrained = source.get("pretrained") if source.get("arch") == model else default_tag(model)
    return EncoderConfig(arch=model, pretrained=pretrained or RANDOM, seed=seed, device=device)

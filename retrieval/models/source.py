"""Where an encoder's weights come from, cheaply: what `index` compares with a collection's manifest to know,
without loading the model, that a run asks for the model the collection was built with.

No torch here. The stamp (size and mtime of the weights files) makes "the same path" mean "the same file": a
weights file or checkpoint rewritten in place no longer matches, and the model is loaded and checked in full.
"""

from __future__ import annotations

import os
from typing import Any

from retrieval.config import EncoderConfig

CHECKPOINT_FILES = ("config.json", "dual_encoder.safetensors")  # what a dual encoder is loaded from


def _stamp(paths: list[str]) -> list[list[int]] | None:
    try:
        return [[st.st_size, st.st_mtime_ns] for st in (os.stat(p) for p in paths)]
    except OSError:
        return None


def model_source(cfg: EncoderConfig) -> dict[str, Any]:
    """The flags that built an encoder, normalised (absolute paths), with a stamp of the files they name."""
    is_file = bool(cfg.pretrained) and os.path.isfile(cfg.pretrained)
    checkpoint = os.path.abspath(cfg.checkpoint) if cfg.checkpoint else None
    if checkpoint:
        stamp = _stamp([os.path.join(checkpoint, name) for name in CHECKPOINT_FILES])
    else:
        stamp = _stamp([cfg.pretrained]) if is_file else None
    return {
        "arch": cfg.arch,
        "pretrained": os.path.abspath(cfg.pretrained) if is_file else cfg.pretrained,
        "checkpoint": checkpoint,
        "seed": cfg.seed,
        "stamp": stamp,
    }


def same_source(model: dict[str, Any], cfg: EncoderConfig) -> bool:
    """Whether `cfg` names exactly the weights a manifest's `model` was built from (arch is ignored for a
    checkpoint, which names its own)."""
    recorded, asked = model.get("source"), model_source(cfg)
    if not recorded or recorded.get("stamp") is None and (asked["checkpoint"] or asked["stamp"]):
        return False
    keys = ("checkpoint", "stamp") if asked["checkpoint"] else ("arch", "pretrained", "seed", "stamp")
    return all(recorded.get(k) == asked[k] for k in keys)

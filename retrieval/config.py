"""One frozen config dataclass per component; every field has a default and a short why.

Run configs (JSON files and `--set key=value`) load into these through `from_dict`, which refuses unknown keys.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from retrieval.errors import UserError

T = TypeVar("T")


def cache_dir() -> Path:
    """The toolkit's cache (remembered digests, text towers): $XDG_CACHE_HOME/retrieval, else ~/.cache/retrieval."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "retrieval"


@dataclass(frozen=True)
class EncoderConfig:
    arch: str = "ViT-B-32"  # any OpenCLIP architecture (open_clip.list_models()) or a preset of ours (tiny-vit-64, ...)
    pretrained: str = (
        "none"  # an OpenCLIP pretrained tag, a local weights file, or 'none': seeded random init
    )
    checkpoint: str | None = None  # a checkpoint directory written by this toolkit; wins over arch/pretrained
    seed: int = 0  # random init seed: the same flags must give the same weights in every process
    device: str = "auto"  # auto: cuda when available, else cpu
    precision: str = "auto"  # auto: bf16 autocast on cuda when supported (fp16 otherwise), fp32 on cpu


@dataclass(frozen=True)
class IndexRunConfig:
    batch_size: int = 64  # images per forward pass
    workers: int = 1  # decode processes; on 2 cores one decoder keeps the model fed without starving it
    commit_every: int = 512  # images per commit at most: bounds the rows held in memory between commits
    commit_seconds: float = 2.0  # commit after the first batch that ends this long after the last commit: a
    # kill loses at most this plus the batch being encoded (a commit costs ~20 ms, so the cadence is nearly free)
    reembed: bool = False  # re-embed everything (required to switch a collection to another model)
    max_pixels: int = 178_956_970  # decompression-bomb limit (PIL's default): larger images are skipped
    # the index (indexes/choose.py); None keeps the collection's own setting (a new one gets IndexConfig's)
    max_memory: int | None = None  # bytes the FAISS index may take in RAM: exact, SQ8 or PQ codes
    target_recall: float | None = None  # recall@10 against exact search that nprobe is tuned to
    flat_max: int | None = None  # exact search up to this many vectors

    def index_settings(self) -> dict[str, Any]:
        names = ("max_memory", "target_recall", "flat_max")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass(frozen=True)
class WatchConfig:
    settle_s: float = 1.0  # quiet time after the last file event before a pass: a burst of copies is one pass
    max_wait_s: float = (
        10.0  # a pass starts at most this long after a burst began, even if events keep coming
    )
    rescan_s: float = 300.0  # full rescan this often whatever the notifications say: catches what they miss
    # (network filesystems, an overflowed inotify queue, more folders than the inotify watch limit)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build a (possibly nested) config dataclass from a dict; unknown keys are an error, never ignored."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}.{name}")
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)  # JSON has no tuples: a saved config's (0.9, 0.98) comes back as a list
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)

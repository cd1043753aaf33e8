"""Attribute binding on image + caption + negative-caption triples, the SugarCrepe / ARO layout: does the model
score an image's true caption above a false one made of the same words ("a white dog on a black couch" vs
"a black dog on a white couch")? Scored by ITC (cosine), by ITM alone and by the score ITM re-ranking sorts by
(`metrics.rerank_score`, what `retrieval eval --rerank` measures).

    triples.jsonl   {"image": "images/0001.jpg", "caption": "...", "negative": "...", "kind": "swap_att"}

Also .json (a list of rows, or SugarCrepe's {"id": row, ...}), .csv, .tsv and .parquet. Columns, first match
wins: the image (`IMAGE_COLUMNS`, a path relative to the file or to `images_root`), the true caption
(`CAPTION_COLUMNS`), the false one (`NEGATIVE_COLUMNS`; a list there gives several) and an optional kind
(`KIND_COLUMNS`) that gets accuracies of its own. Bad rows and unreadable images are skipped and counted.

Memory: every distinct image's patch tokens are kept, as in evaluate.py (a few thousand images at ViT-B/16 is
a few GB); split a larger file.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retrieval.data.pairs import Pair
from retrieval.errors import UserError
from retrieval.eval.scoring import (
    PairScorer,
    Tokenizer,
    binding_scores,
    encode_images,
    encode_texts,
    evaluating,
)
from retrieval.models.albef import AlbefModel

IMAGE_COLUMNS = ("image", "image_path", "filename", "file_name", "filepath", "path")
CAPTION_COLUMNS = ("caption", "positive", "pos", "true_caption", "text")
NEGATIVE_COLUMNS = ("negative", "neg", "negative_caption", "false_caption", "hard_negative", "negatives")
KIND_COLUMNS = ("kind", "type", "category")
FORMATS = ".jsonl, .json, .csv, .tsv or .parquet"


@dataclass(frozen=True)
class BindingConfig:
    images_root: str | None = None  # folder the image paths are relative to; None: the triples file's folder
    batch_size: int = 128  # images or texts per encoder pass
    itm_batch_size: int = 256  # (text, image) pairs per fusion pass


@dataclass
class Triple:
    image: str  # resolved path
    caption: str  # true for the image
    negatives: list[str]  # false for it, one or more
    kind: str | None = None  # e.g. SugarCrepe's replace_att / swap_obj; accuracies per kind when given


def load_triples(path: str | os.PathLike, images_root: str | None = None) -> tuple[list[Triple], int]:
    """(the usable triples, how many rows were skipped: missing image, empty caption or negative)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such triples file; pass {FORMATS} with image, caption, negative columns")
    base = Path(images_root) if images_root else path.parent
    triples, skipped, columns = [], 0, None
    for row in _rows(path):
        if columns is None:
            columns = _columns(path, row)
        triple = _triple(row, columns, base)
        if triple is None:
            skipped += 1
        else:
            triples.append(triple)
    if not triples:
        raise UserError(f"{path}: no usable triples ({skipped} rows skipped: missing image or empty caption)")
    return triples, skipped


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            with open(path, encoding="utf-8-sig") as f:
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        yield row if isinstance(row, dict) else {}
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            rows = data.values() if isinstance(data, dict) else data  # SugarCrepe: {"0": {...}, ...}
            yield from (row if isinstance(row, dict) else {} for row in rows)
        elif suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8-sig", newline="") as f:
                yield from csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        else:
            raise UserError(f"{path}: unknown triples format {suffix or '(no suffix)'!r}; pass {FORMATS}")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error, OSError) as e:
        raise UserError(f"{path}: cannot read triples ({str(e).splitlines()[0]})") from e
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        if isinstance(e, UserError):
            raise
        raise UserError(f"{path}: cannot read triples ({type(e).__name__}: {e})") from e


def _columns(path: Path, row: dict[str, Any]) -> tuple[str, str, str, str | None]:
    def first(names: Sequence[str]) -> str | None:
        return next((n for n in names if n in row), None)

    found = (first(IMAGE_COLUMNS), first(CAPTION_COLUMNS), first(NEGATIVE_COLUMNS))
    if None in found:
        groups = (IMAGE_COLUMNS, CAPTION_COLUMNS, NEGATIVE_COLUMNS)
        wanted = [names for names, col in zip(groups, found, strict=True) if not col]
        spellings = "; ".join(" | ".join(names) for names in wanted)
        raise UserError(f"{path}: columns {sorted(row)} lack one of: {spellings}")
    return (*found, first(KIND_COLUMNS))  # type: ignore[return-value]


def _triple(row: dict[str, Any], columns: tuple[str, str, str, str | None], base: Path) -> Triple | None:
    image_col, caption_col, negative_col, kind_col = columns
    image, caption, negative = row.get(image_col), row.get(caption_col), row.get(negative_col)
    negatives = negative if isinstance(negative, list) else [negative]
    negatives = [n.strip() for n in negatives if isinstance(n, str) and n.strip()]
    if not isinstance(image, str) or not image.strip() or not isinstance(caption, str) or not caption.strip():
        return None
    resolved = os.path.normpath(image if os.path.isabs(image) else base / image)
    if not negatives or not os.path.isfile(resolved):
        return None
    kind = row.get(kind_col) if kind_col else None
    return Triple(resolved, caption.strip(), negatives, str(kind) if kind not in (None, "") else None)


def evaluate_binding(
    model: AlbefModel,
    triples: list[Triple],
    cfg: BindingConfig,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    tokenizer: Tokenizer,
    device: torch.device,
) -> dict[str, float | int]:
    """ "binding" (ITM), "binding.itc", "binding.rerank", each per kind too ("binding.itc.swap_att"), over every
    (true, false) comparison; "binding.n_triples" scored and "binding.skipped_images" that could not be
    decoded. The model is put in eval mode and restored afterwards."""
    with evaluating(model):
        return _evaluate(model, triples, cfg, image_size, mean, std, tokenizer, device)


def _evaluate(model, triples, cfg: BindingConfig, image_size, mean, std, tokenizer, device):
    distinct = list(dict.fromkeys(t.image for t in triples))
    candidates = [Pair(path, path, "") for path in distinct]
    gallery, images = encode_images(
        model.clip, candidates, image_size, mean, std, device, cfg.batch_size, keep_tokens=True
    )
    row_of = {pair.key: i for i, pair in enumerate(gallery)}
    kept = [t for t in triples if t.image in row_of]
    captions = list(dict.fromkeys(c for t in kept for c in (t.caption, *t.negatives)))
    index = {c: i for i, c in enumerate(captions)}
    texts = encode_texts(model.clip, tokenizer, captions, device, cfg.batch_size, keep_tokens=True)
    itm = PairScorer(model, texts, images, cfg.itm_batch_size)
    result = binding_scores(
        itm,
        texts,
        images,
        [row_of[t.image] for t in kept],
        [index[t.caption] for t in kept],
        [[index[n] for n in t.negatives] for t in kept],
        [[t.kind] * len(t.negatives) if t.kind else [] for t in kept],
        float(model.logit_scale.exp()),
    )
    skipped = len(distinct) - len(gallery)
    return {**result, "binding.n_triples": len(kept), "binding.skipped_images": skipped}

"""VLM training data: JSONL rows with image + caption (stage 1) or image + question + answer (stage 2).

Images are decoded once; the frozen vision tower's outputs for them (and for a few recoloured copies of them)
are computed once and cached (exact: nothing before the connector trains). Batches are a pure function of (seed, step), so a resumed run draws the same ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from retrieval.data.images import ImageDecodeError, load_for_model
from retrieval.data.recolour import draw_permutations, recolour, swap_words
from retrieval.errors import UserError
from retrieval.models.encoders import normalize
from retrieval.progress import progress_bar


@dataclass
class VlmRows:
    images: list[str] = field(default_factory=list)  # resolved paths, one per distinct image
    captions: list[tuple[int, str]] = field(default_factory=list)  # (image index, caption): stage 1
    qa: list[tuple[int, str, str]] = field(default_factory=list)  # (image index, question, answer): stage 2
    kinds: list[str] = field(default_factory=list)  # per qa row, its "kind" column or ""
    skipped: int = 0  # rows without a usable image or text


def read_rows(path: str | Path) -> VlmRows:
    """Parse a JSONL file; image paths are relative to it. Rows with neither a caption nor a question+answer, or
    with a missing image, are skipped and counted."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from e
    rows, index = VlmRows(), {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not JSON ({e.msg})") from e
        image = row.get("image")
        resolved = str(path.parent / image) if image else None
        if not resolved or not Path(resolved).is_file():
            rows.skipped += 1
            continue
        i = index.setdefault(resolved, len(index))
        if i == len(rows.images):
            rows.images.append(resolved)
        if str(row.get("question") or "").strip() and str(row.get("answer") or "").strip():
            rows.qa.append((i, str(row["question"]).strip(), str(row["answer"]).strip()))
            rows.kinds.append(str(row.get("kind", "")))
        elif str(row.get("caption") or row.get("text") or "").strip():
            rows.captions.append((i, str(row.get("caption") or row.get("text")).strip()))
        else:
            rows.skipped += 1
    return rows


def load_pixels(paths: list[str], size: int, progress: bool = False) -> tuple[torch.Tensor, list[bool]]:
    """uint8 (N, 3, size, size) and whether each image decoded (a failed one is black and never drawn)."""
    out = torch.zeros(len(paths), 3, size, size, dtype=torch.uint8)
    ok = []
    for i, p in enumerate(progress_bar(paths, desc="images", unit="img", enabled=progress)):
        try:
            arr, _, _ = load_for_model(p, size)
            out[i] = torch.from_numpy(arr).permute(2, 0, 1)
            ok.append(True)
        except (ImageDecodeError, OSError):
            ok.append(False)
    return out, ok


@torch.no_grad()
def cache_features(vlm, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """What the connector reads for every image, computed once: (N, ...) float32 on the CPU."""
    chunks = []
    for start in range(0, len(pixels), batch):
        x = normalize(pixels[start : start + batch], vlm.image["mean"], vlm.image["std"], torch.device("cpu"))
        chunks.append(vlm.features(x))
    return torch.cat(chunks)


def draw(n: int, batch: int, seed: int, step: int) -> np.ndarray:
    """The row indices of one step: a pure function of (seed, step), so resume draws the same batches."""
    return np.random.default_rng((seed, step)).choice(n, size=min(batch, n), replace=False)


class Recoloured:
    """`variants` recoloured copies of every image's features (data/recolour.py: hues and colour words permuted
    together), computed once like the plain ones, and the permutations that made them; `draw` swaps a batch's
    rows for a copy with probability `prob` and rewrites their questions and answers to match."""

    def __init__(
        self, vlm, pixels: torch.Tensor, feats: torch.Tensor, among: list[int], variants: int, seed: int
    ):
        g = torch.Generator().manual_seed(seed + 41)
        self.perms = [draw_permutations(len(pixels), 1.0, g, among) for _ in range(variants)]  # [K][N]
        copies = [feats]
        for perms in self.perms:
            chunks = [
                cache_features(vlm, recolour(pixels[s : s + 256], perms[s : s + 256]))
                for s in range(0, len(pixels), 256)
            ]
            copies.append(torch.cat(chunks))
        self.feats = torch.stack(copies)  # (K+1, N, ...): copy 0 is the image as it is

    def draw(
        self, index: torch.Tensor, chats: list[list[tuple[str, str]]], prob: float, rng: np.random.Generator
    ) -> tuple[torch.Tensor, list[list[tuple[str, str]]]]:
        """(features (B, ...), chats) for images `index` (B,): each row a recoloured copy with probability prob."""
        n = len(index)
        copy = np.where(rng.random(n) < prob, rng.integers(1, len(self.feats), n), 0)  # (B,)
        out = []
        for k, i, chat in zip(copy.tolist(), index.tolist(), chats, strict=True):
            perm = self.perms[k - 1][i] if k else None
            out.append(
                chat if perm is None else [(swap_words(q, perm), swap_words(a, perm)) for q, a in chat]
            )
        return self.feats[torch.from_numpy(copy), index], out

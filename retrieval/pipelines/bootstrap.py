"""`retrieval bootstrap`: BLIP's CapFilt on a pairs dataset. For every image: the filter's ITM head scores each
web caption; the captioner writes `samples` synthetic captions by nucleus sampling, which are scored too; what
scores at least the threshold is kept. The output is a new dataset in the input's format with provenance on
every row (pipelines/bootstrap_io.py); the input is never modified.

Work goes in shards of images. A finished shard is a part file renamed into place; a re-run (after Ctrl-C or
kill -9) skips the parts that exist and redoes only the rest. Every random draw of a shard comes from a seed of
(seed, shard), so the output is byte-identical to an uninterrupted run's.

    OUT/pairs.<ext> | OUT/pairs/*.tar        kept web and synthetic rows
    OUT/dropped.<ext> | OUT/dropped/*.tar    web rows the filter dropped
    OUT/bootstrap.json, OUT/scores.png        the report and the score histograms
    OUT/.bootstrap/plan.json, parts/          the run's settings and finished shards
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.data.grouping import IMAGE_ID_COLUMNS, ImageGroups, group_pairs
from retrieval.data.pairs import PairStats, detect_format, iter_pairs
from retrieval.errors import UserError
from retrieval.models.generate import GenerateConfig
from retrieval.pipelines import bootstrap_io as io
from retrieval.pipelines.caption import caption_pixels, image_size, pixels_of
from retrieval.pipelines.itm_filter import FilterScorer, recorded_threshold
from retrieval.progress import progress_bar

DEFAULT_THRESHOLD = 0.5  # for a filter without a calibrated threshold (capfilt records one)


@dataclass(frozen=True)
class BootstrapConfig:
    samples: int = 3  # synthetic captions drawn per image (BLIP draws one per image per epoch); 0: none
    threshold: float | None = (
        None  # ITM match probability to keep a caption; None: the filter's calibrated one
    )
    top_p: float = 0.9  # nucleus sampling for the synthetic captions (BLIP: diverse beats likely)
    temperature: float = 1.0
    shard_images: int = 256  # images per shard: the work lost to a kill, at most
    batch_size: int = 64  # images per captioning / scoring batch
    seed: int = 0  # with the shard index, seeds every sampling draw
    device: str = "auto"


def bootstrap(
    pairs: str,
    out: str | os.PathLike,
    captioner: str | None,
    filter_dir: str | None,
    cfg: BootstrapConfig = BootstrapConfig(),
    progress: bool = True,
) -> dict[str, Any]:
    """Bootstrap `pairs` into `out`. No filter: every caption is kept (BLIP's "captioner only"); no captioner or
    samples=0: web captions only ("filter only"). Returns the report."""
    from retrieval.models.encoders import resolve_device

    out = Path(out)
    fmt = detect_format(pairs)
    stats = PairStats()
    rows = list(iter_pairs(pairs, stats))
    groups = group_pairs(rows)
    if not len(groups):
        raise UserError(f"{pairs}: no usable image-text pairs")
    _check_paths(pairs, out, fmt)
    device = resolve_device(cfg.device)
    scorer = FilterScorer(filter_dir, device) if filter_dir else None
    threshold = (
        cfg.threshold
        if cfg.threshold is not None
        else (recorded_threshold(filter_dir) if filter_dir else None)
    )
    threshold = DEFAULT_THRESHOLD if threshold is None and filter_dir else threshold
    model = _captioner(captioner, cfg, device)
    plan = _plan(pairs, out, fmt, captioner, filter_dir, threshold, cfg, len(groups))
    n_shards = plan["shards"]
    parts_dir = out / ".bootstrap" / "parts"
    bar = progress_bar(desc="bootstrap", unit="img", enabled=progress, total=len(groups))
    done_before = 0
    for k in range(n_shards):
        part = parts_dir / f"part-{k:05d}.jsonl"
        lo, hi = k * cfg.shard_images, min(len(groups), (k + 1) * cfg.shard_images)
        if not part.exists():
            records = _shard(groups, rows, lo, hi, k, out, model, scorer, threshold, cfg, plan, device, pairs)
            io.write_part(part, records)
        else:
            done_before += 1
        bar.update(hi - lo)
    bar.close()
    if done_before and progress:
        print(f"bootstrap: {done_before} of {n_shards} shards were already done", file=sys.stderr)
    parts = [io.read_part(parts_dir / f"part-{k:05d}.jsonl") for k in range(n_shards)]
    images = {p.key: p.image for p in groups.images if isinstance(p.image, bytes)}
    io.write_output(out, fmt, parts, images)
    from retrieval.pipelines.bootstrap_report import report

    return report(out, parts, plan, stats)


def _check_paths(pairs: str, out: Path, fmt: str) -> None:
    src = Path(pairs).resolve()
    for name in io.output_names(fmt):
        if (out / name).resolve() == src or src in (out / name).resolve().parents:
            raise UserError(f"--out {out} would overwrite the input {pairs}; choose another --out")


def _captioner(captioner: str | None, cfg: BootstrapConfig, device):
    if not captioner or cfg.samples == 0:
        return None
    from retrieval.models.captioner import load_captioner

    model, _, _ = load_captioner(captioner)
    return model.to(device)


def _identity(path: str | None) -> str | None:
    """A checkpoint's identity: its path and a digest of its config.json (which names its weights)."""
    if not path:
        return None
    digest = hashlib.blake2b((Path(path) / "config.json").read_bytes(), digest_size=6).hexdigest()
    return f"{path}#{digest}"


def _plan(pairs, out: Path, fmt, captioner, filter_dir, threshold, cfg, n_images) -> dict[str, Any]:
    """The run's settings, written on the first run; a re-run with others is refused (its parts would mix)."""
    plan = {
        "input": str(pairs),
        "format": fmt,
        "images": n_images,
        "captioner": _identity(captioner) if cfg.samples else None,
        "filter": _identity(filter_dir),
        "threshold": threshold,
        "config": dataclasses.asdict(cfg) | {"device": None},
        "shards": -(-n_images // cfg.shard_images),
    }
    path = out / ".bootstrap" / "plan.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != plan:
            changed = sorted(k for k in plan if old.get(k) != plan[k])
            raise UserError(
                f"{out} holds a bootstrap run with other settings ({', '.join(changed)}); "
                "choose another --out or delete it"
            )
    else:
        io.atomic_write(path, json.dumps(plan, indent=2).encode())
    return plan


def _base_row(pair, out: Path) -> dict[str, Any]:
    """The input row's columns, the image path rewritten relative to the output (so the output trains as it
    is); binary images (None here) are filled in from the input when the output is written."""
    image = None if isinstance(pair.image, bytes) else os.path.relpath(pair.image, out.resolve())
    return {"image": image, "caption": pair.caption, **pair.extra}


def _as_given(pair, pairs: str) -> str:
    """The image as the input names it: a tar member's key, else the path relative to the input's folder
    (as a table gives it), or the absolute path of an image outside that folder."""
    if isinstance(pair.image, bytes):
        return pair.key
    folder = Path(pairs).resolve().parent
    path = Path(pair.image).resolve()
    return str(path.relative_to(folder)) if folder in path.parents else str(path)


def _shard(groups: ImageGroups, rows, lo, hi, k, out, model, scorer, threshold, cfg, plan, device, pairs):
    """The records of images lo..hi-1: their web rows and their synthetic captions, scored."""
    gen = GenerateConfig(top_p=cfg.top_p, temperature=cfg.temperature, seed=0)
    prov = {"captioner": plan["captioner"], "filter": plan["filter"]}
    given = {}  # image index -> the path as the input gives it
    records: list[dict[str, Any]] = []
    for b0 in range(lo, hi, cfg.batch_size):
        idx = list(range(b0, min(hi, b0 + cfg.batch_size)))
        size = scorer.image_size if scorer is not None else image_size(model)
        pixels, ok = pixels_of(size, [groups.images[i].image for i in idx])
        good = [idx[j] for j in ok]
        web = [(i, c) for i in good for c in groups.captions_of(i)]
        synth: list[tuple[int, str]] = []
        if model is not None and good:
            seed = (cfg.seed * 1_000_003 + k) * 1_009 + (b0 - lo)  # per shard and batch: resumable draws
            texts = caption_pixels(model, pixels, dataclasses.replace(gen, seed=seed), device, cfg.samples)
            for j, i in enumerate(good):
                mine = dict.fromkeys(t for t in texts[j * cfg.samples : (j + 1) * cfg.samples] if t)
                synth += [(i, t) for t in mine]  # distinct captions, in the order drawn
        pos = {i: j for j, i in enumerate(good)}
        scores = (
            scorer.score(
                pixels,
                [groups.captions[c] for _, c in web] + [t for _, t in synth],
                [pos[i] for i, _ in web] + [pos[i] for i, _ in synth],
            )
            if scorer is not None and (web or synth)
            else None
        )
        for i in good:
            given[i] = _as_given(groups.images[i], pairs)
        for n, (i, c) in enumerate(web):
            records.append(
                _record(rows[c], _base_row(rows[c], out), "web", scores, n, threshold, prov, given[i])
            )
        for n, (i, text) in enumerate(synth, start=len(web)):
            pair = groups.images[i]
            row = {"image": _base_row(pair, out)["image"], "caption": text}
            row.update({col: pair.extra[col] for col in IMAGE_ID_COLUMNS if col in pair.extra})
            records.append(_record(pair, row, "synthetic", scores, n, threshold, prov, given[i]))
    return records


def _record(pair, row, source, scores, n, threshold, prov, given: str) -> dict[str, Any]:
    score = None if scores is None else round(float(scores[n]), 6)
    kept = True if score is None or threshold is None else score >= threshold
    row.update({"source": source, "score": score, "kept": kept, "input_image": given, **prov})
    return {"key": pair.key, "row": row}

"""Generated captioned scenes for demos, tests and benchmarks: coloured shapes on clutter, never a download.

A scene is one or two shapes, each a (size, colour, shape) triple, and for two a spatial relation. Captions use one
fixed wording, so swapping attributes between the objects gives a caption that is false for the image but uses the
same words: a true hard negative that only attribute binding can reject. A fixed set of (colour, shape) combinations
never appears in the train split and appears in every held-out scene, to measure compositional generalisation.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from retrieval.data.wording import WORDINGS, varied_wordings
from retrieval.errors import UserError
from retrieval.progress import progress_bar

# Hues far apart so that a 64px, JPEG-compressed crop still names its colour without doubt.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 30),
    "purple": (145, 55, 195),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")  # a cross, not a star: a small star blurs at 64px
SIZES = {"small": 0.18, "large": 0.40}  # side of the shape's box as a fraction of the image side
RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
REVERSED = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# 5 of 24 combinations (~20%), one per colour along a diagonal so every colour and shape is still seen in training.
# Fixed rather than drawn from the seed: a model trained on one seed's data can be evaluated on another's.
HELDOUT_COMBOS = (
    ("red", "circle"),
    ("green", "square"),
    ("blue", "triangle"),
    ("yellow", "cross"),
    ("purple", "circle"),
)
ATTRIBUTES = ("color", "shape", "size")
_ALL_VALUES = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES)}
_CROSS_X = (0.33, 0.67, 0.67, 1, 1, 0.67, 0.67, 0.33, 0.33, 0, 0, 0.33)  # arms a third of the box wide
_POLYGONS = {  # unit-box outlines; the square is inset so it looks as big as a circle of its size class
    "square": ((0.07, 0.07), (0.93, 0.07), (0.93, 0.93), (0.07, 0.93)),
    "triangle": ((0.5, 0.03), (0.98, 0.92), (0.02, 0.92)),
    "cross": tuple(zip(_CROSS_X, _CROSS_X[3:] + _CROSS_X[:3], strict=True)),  # y: x a quarter turn on
}
_OBJ_RE = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_CAPTION_RE = re.compile(rf"^{_OBJ_RE}(?: ({'|'.join(RELATIONS.values())}) {_OBJ_RE})?$")


@dataclass(frozen=True)
class SynthConfig:
    n: int = 2000  # total images over both splits: enough for a smoke-test training run in a few minutes
    heldout_fraction: float = 0.2  # share of the n images in heldout.jsonl, the split of unseen combinations
    image_size: int = 128  # side in pixels; models here train at 64, so 128 leaves headroom for crops
    noise: float = 0.0  # share of train captions swapped for another image's caption, to test caption filters
    seed: int = 0  # same seed, same bytes: scenes, layouts, backgrounds and noise all derive from it
    two_object_prob: float = 0.7  # most scenes need binding and relations; single shapes keep it learnable
    jpeg_quality: int = 90  # high enough that colours of small shapes survive compression
    workers: int = 2  # render processes; never changes the output, only the speed
    captions: int = 1  # captions per image, one row each (COCO-style: rows of one image share its path)
    wording: str = "fixed"  # fixed: the one wording (caption_for); varied: each caption in another wording of
    # data/wording.py, which the rows name in a "wording" column


def caption_for(objects: Sequence[dict[str, str]], relation: str | None) -> str:
    """The one wording for a scene: 'a small red circle to the left of a large blue square'."""
    phrases = [f"a {o['size']} {o['color']} {o['shape']}" for o in objects]
    if len(objects) == 1:
        return phrases[0]
    if len(objects) != 2 or relation not in RELATIONS:
        raise ValueError(f"a scene has one object, or two and a relation; got {len(objects)}, {relation!r}")
    return f"{phrases[0]} {RELATIONS[relation]} {phrases[1]}"


def parse_caption(caption: str) -> tuple[list[dict[str, str]], str | None]:
    """Inverse of caption_for: (objects, relation); ValueError if the caption is not in the one wording."""
    m = _CAPTION_RE.match(caption)
    if not m:
        raise ValueError(f"not a synth caption: {caption!r}")
    g = m.groups()
    objects = [{"color": g[1], "size": g[0], "shape": g[2]}]
    if g[3] is None:
        return objects, None
    objects.append({"color": g[5], "size": g[4], "shape": g[6]})
    relation = next(k for k, v in RELATIONS.items() if v == g[3])
    return objects, relation


def scene_key(objects: Sequence[dict[str, str]], relation: str | None) -> str:
    """What the image shows, whatever the wording: 'A left of B' and 'B right of A' share one key.

    Scenes repeat (a held-out split has only 10 one-object scenes), so a retrieval evaluation should count every
    gallery image with the query's key as a hit, or strict R@1 is capped well below 1 by exact duplicates.
    """
    if relation is None:
        return caption_for(objects, None)
    return min(caption_for(objects, relation), caption_for(objects[::-1], REVERSED[relation]))


def _has_combo(objects: Sequence[dict[str, str]], combos: set[tuple[str, str]]) -> bool:
    return any((o["color"], o["shape"]) in combos for o in objects)


def hard_negative_captions(
    row: dict[str, Any], rng: random.Random | None = None, avoid: Iterable[tuple[str, str]] = ()
) -> list[str]:
    """Captions that are false for the row's image yet differ from the truth only in binding or relation.

    Two objects: each attribute that differs between them swapped (same words, other binding), then the relation
    reversed. One object: each attribute changed to another value (the next in palette order, or a random one
    with rng). Built from the structured fields, so a noisy row still gets negatives of its image. Captions with a
    (colour, shape) in `avoid` are left out: pass HELDOUT_COMBOS when training so negatives do not leak them.
    """
    return [caption for _, caption in hard_negatives(row, rng, avoid)]


def hard_negatives(
    row: dict[str, Any], rng: random.Random | None = None, avoid: Iterable[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    """hard_negative_captions with the kind of each: (kind, caption), kind one of ATTRIBUTES (the attribute
    swapped or changed) or "relation" (the relation reversed)."""
    objects, relation = row["objects"], row.get("relation")
    avoid = set(avoid)
    variants: list[tuple[str, list[dict[str, str]], str | None]] = []
    if len(objects) == 2:
        for attr in ATTRIBUTES:
            if objects[0][attr] != objects[1][attr]:
                a, b = dict(objects[0]), dict(objects[1])
                a[attr], b[attr] = b[attr], a[attr]
                variants.append((attr, [a, b], relation))
        variants.append(("relation", list(objects), REVERSED[relation]))
    else:
        for attr in ATTRIBUTES:
            values = _ALL_VALUES[attr]
            others = [v for v in values if v != objects[0][attr]]
            if rng is None:  # deterministic: walk the palette from the current value
                start = values.index(objects[0][attr])
                others = [values[(start + k) % len(values)] for k in range(1, len(values))]
            else:
                rng.shuffle(others)
            for value in others:
                changed = [{**objects[0], attr: value}]
                if not _has_combo(changed, avoid):
                    variants.append((attr, changed, None))
                    break
    return [(kind, caption_for(o, r)) for kind, o, r in variants if not _has_combo(o, avoid)]


def swap_attributes(
    objects: Sequence[dict[str, str]],
    relation: str | None,
    rng: random.Random,
    avoid: Iterable[tuple[str, str]] = (),
) -> str:
    """One hard negative drawn at random from hard_negative_captions (for samplers that want one per scene)."""
    options = hard_negative_captions({"objects": list(objects), "relation": relation}, rng, avoid)
    if not options:
        raise ValueError(f"no hard negative avoids the combos for {caption_for(objects, relation)!r}")
    return rng.choice(options)


def _sample_scene(rng: random.Random, heldout: bool, two_object_prob: float) -> dict[str, Any]:
    held = set(HELDOUT_COMBOS)
    seen = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in held]
    anything = seen + list(HELDOUT_COMBOS)
    sizes = list(SIZES)
    if rng.random() >= two_object_prob:
        color, shape = rng.choice(HELDOUT_COMBOS if heldout else seen)
        return {"objects": [{"color": color, "size": rng.choice(sizes), "shape": shape}], "relation": None}
    first = rng.choice(HELDOUT_COMBOS if heldout else seen)
    # different colour and shape: every swap then changes the caption, and nothing is named twice
    second = rng.choice([c for c in (anything if heldout else seen) if c[0] != first[0] and c[1] != first[1]])
    pair = [first, second] if rng.random() < 0.5 else [second, first]
    objects = [{"color": c, "size": rng.choice(sizes), "shape": s} for c, s in pair]
    return {"objects": objects, "relation": rng.choice(list(RELATIONS))}


def _shape_mask(shape: str, side: int) -> Image.Image:
    # drawn at 4x and box-filtered down: smooth edges without per-pixel work in Python
    big = 4 * side
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((0, 0, big - 1, big - 1), fill=255)
    elif shape in _POLYGONS:
        draw.polygon([(x * big, y * big) for x, y in _POLYGONS[shape]], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return mask.resize((side, side), Image.Resampling.BOX)


def _layout(
    rng: np.random.Generator, sides: list[int], relation: str | None, size: int
) -> list[tuple[int, int]]:
    """Top-left corners. For a relation the boxes are disjoint along its axis and roughly aligned across it."""
    margin = max(1, round(0.03 * size))
    if relation is None:
        lo, hi = margin, size - margin - sides[0] + 1
        return [(int(rng.integers(lo, hi)), int(rng.integers(lo, hi)))]
    # order along the axis (left to right, or top to bottom); objects[0] is the caption's subject
    order = [0, 1] if relation in ("left of", "above") else [1, 0]
    a, b = sides[order[0]], sides[order[1]]
    gap = max(2, round(0.05 * size))
    slack = max(0, size - 2 * margin - a - b - gap)
    u1, u2 = sorted(rng.uniform(0, 1, 2))
    along = [margin + round(slack * u1)]
    along.append(along[0] + a + gap + round(slack * (u2 - u1)))
    # a shared centre line plus a jitter under a third of the smallest spacing, so "left of" never reads as "above"
    big = max(a, b)
    centre = rng.uniform(margin + big / 2, size - margin - big / 2)
    across = []
    for s in (a, b):
        c = centre + rng.uniform(-0.04, 0.04) * size
        across.append(int(np.clip(round(c - s / 2), margin, size - margin - s)))
    corners = [(along[k], across[k]) for k in range(2)]
    if relation in ("above", "below"):
        corners = [(y, x) for x, y in corners]
    placed = [(0, 0), (0, 0)]
    placed[order[0]], placed[order[1]] = corners[0], corners[1]
    return placed


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Greyish clutter: low-contrast blotches, grain, thin lines and faint blobs, no saturated colour."""
    base = (rng.uniform(80, 175) + rng.uniform(-8, 8, 3)).astype(np.float32)  # slightly tinted grey
    coarse = rng.normal(0, 1, (5, 5)).astype(np.float32)
    blotch = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    texture = 14 * blotch + 4 * rng.standard_normal((size, size), dtype=np.float32)  # (H, W), grey grain
    pixels = base + texture[..., None]  # (H, W, 3)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    mean = float(base.mean())

    def grey(low: float, high: float) -> tuple[int, int, int]:
        level = mean + (1 if rng.random() < 0.5 else -1) * rng.uniform(low, high)
        return tuple(max(0, min(255, int(level + rng.uniform(-6, 6)))) for _ in range(3))

    for _ in range(int(rng.integers(2, 6))):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, 4))
        draw.line((x0, y0, x1, y1), fill=grey(18, 40), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(0, 4))):
        x, y = (int(v) for v in rng.integers(0, size, 2))
        r = int(rng.integers(size // 20, size // 8))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=grey(10, 24))
    return img


def _render(task: tuple[int, str, dict[str, Any], int, int, int]) -> None:
    index, path, scene, size, seed, quality = task
    rng = np.random.default_rng((seed, index))  # per image: output does not depend on the worker count
    img = _background(rng, size)
    sides = [round(SIZES[o["size"]] * size * rng.uniform(0.92, 1.08)) for o in scene["objects"]]
    corners = _layout(rng, sides, scene["relation"], size)
    for obj, side, (x, y) in zip(scene["objects"], sides, corners, strict=True):
        colour = tuple(max(0, min(255, c + int(rng.integers(-12, 13)))) for c in COLORS[obj["color"]])
        img.paste(colour, (x, y, x + side, y + side), _shape_mask(obj["shape"], side))
    img.save(path, format="JPEG", quality=quality, subsampling=0)  # 4:4:4: small shapes keep their colour


def _check(cfg: SynthConfig) -> None:
    problems = [
        (cfg.n < 2, f"-n {cfg.n}: need at least 2 images (one per split)"),
        (not 0 < cfg.heldout_fraction < 1, f"heldout_fraction {cfg.heldout_fraction}: must be in (0, 1)"),
        (not 0 <= cfg.noise <= 1, f"--noise {cfg.noise}: must be a fraction in [0, 1]"),
        (cfg.image_size < 32, f"--image-size {cfg.image_size}: use 32 or more for recognisable shapes"),
        (not 0 <= cfg.two_object_prob <= 1, f"two_object_prob {cfg.two_object_prob}: must be in [0, 1]"),
        (cfg.wording not in ("fixed", "varied"), f"--wording {cfg.wording}: expected fixed or varied"),
        (cfg.captions < 1, f"--captions {cfg.captions}: need at least 1"),
        (
            cfg.captions > 1 and cfg.wording == "fixed",
            "--captions > 1 needs --wording varied (one wording repeats)",
        ),
    ]
    for bad, message in problems:
        if bad:
            raise UserError(message)


def _prepare(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; pick a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "synth.json").is_file():
            raise UserError(f"{out}: not empty and holds no synth.json; pick a new or empty folder")
        for old in (out / "images").rglob("*.jpg"):  # a regenerated set must not keep stale images
            old.unlink()
    for split in ("train", "heldout"):  # one folder per split, so `retrieval index` can take the held-out one
        (out / "images" / split).mkdir(parents=True, exist_ok=True)


def _add_noise(rows: list[dict[str, Any]], fraction: float, rng: random.Random) -> int:
    k = round(fraction * len(rows))
    if k and len({r["clean_caption"] for r in rows}) < 2:
        raise UserError("--noise needs at least two distinct train captions; raise -n")
    for i in rng.sample(range(len(rows)), k):
        j = rng.randrange(len(rows))
        while rows[j]["clean_caption"] == rows[i]["clean_caption"]:  # a noisy caption must be wrong
            j = rng.randrange(len(rows))
        rows[i]["caption"], rows[i]["noisy"] = rows[j]["clean_caption"], True
    return k


def generate(out_dir: str | Path, cfg: SynthConfig = SynthConfig(), progress: bool = True) -> dict[str, Any]:
    """Write images/, train.jsonl, heldout.jsonl and synth.json under out_dir; return a summary dict."""
    _check(cfg)
    start = time.perf_counter()
    out = Path(out_dir)
    _prepare(out)
    n_heldout = max(1, min(cfg.n - 1, round(cfg.n * cfg.heldout_fraction)))
    n_train = cfg.n - n_heldout
    rng = random.Random(cfg.seed)
    width = max(6, len(str(cfg.n - 1)))
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "heldout": []}
    tasks = []
    for i in range(cfg.n):
        split = "train" if i < n_train else "heldout"
        scene = _sample_scene(rng, split == "heldout", cfg.two_object_prob)
        rel = f"images/{split}/{i:0{width}d}.jpg"
        for wording in varied_wordings(cfg.captions, rng) if cfg.wording == "varied" else [None]:
            caption = caption_for(scene["objects"], scene["relation"])
            row = {"image": rel, "caption": caption, **scene, "noisy": False}
            if wording is not None:
                row["caption"] = WORDINGS[wording].render(scene["objects"], scene["relation"])
                row["wording"] = wording
            row["clean_caption"] = row["caption"]
            splits[split].append(row)
        tasks.append((i, str(out / rel), scene, cfg.image_size, cfg.seed, cfg.jpeg_quality))
    noisy = _add_noise(splits["train"], cfg.noise, rng)

    bar = progress_bar(desc="synth", unit="img", enabled=progress, total=cfg.n)
    if cfg.workers > 1 and cfg.n >= 256:  # below that, starting processes costs more than it saves
        with multiprocessing.get_context().Pool(cfg.workers) as pool:
            for _ in pool.imap_unordered(_render, tasks, chunksize=32):
                bar.update()
    else:
        for task in tasks:
            _render(task)
            bar.update()
    bar.close()

    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    counts = {"train": n_train, "heldout": n_heldout, "noisy": noisy, "captions": cfg.captions}
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "workers"}
    meta = {
        "generator": "retrieval.data.synth",
        "config": settings,
        "colors": COLORS,
        "shapes": SHAPES,
        "sizes": SIZES,
        "relations": list(RELATIONS),
        "heldout_combos": [list(c) for c in HELDOUT_COMBOS],
        "counts": counts,
    }
    (out / "synth.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    heldout = [f"{c} {s}" for c, s in HELDOUT_COMBOS]
    return {**counts, "heldout_combos": heldout, "out_dir": str(out), "seconds": time.perf_counter() - start}

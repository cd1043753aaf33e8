"""The synthetic scene generator: determinism, held-out split, noise, captions, hard negatives, geometry."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.data import synth
from retrieval.data.synth import (
    COLORS,
    HELDOUT_COMBOS,
    SynthConfig,
    caption_for,
    generate,
    hard_negative_captions,
    parse_caption,
    scene_key,
    swap_attributes,
)
from retrieval.errors import UserError

HELD = set(HELDOUT_COMBOS)


def rows(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]


def combos(objects: list[dict]) -> set[tuple[str, str]]:
    return {(o["color"], o["shape"]) for o in objects}


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def noisy_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    summary = generate(out, SynthConfig(n=300, noise=0.25, image_size=64, seed=3), progress=False)
    return out, summary


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    cfg = SynthConfig(n=30, noise=0.2, seed=7)
    generate(tmp_path / "a", cfg, progress=False)
    generate(tmp_path / "b", cfg, progress=False)
    generate(tmp_path / "c", SynthConfig(n=30, noise=0.2, seed=8), progress=False)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert len(a) == 30 + 4 and a == b  # images, train, heldout, heldout_binding, synth.json
    assert (
        a["train.jsonl"] != c["train.jsonl"] and a["images/train/000000.jpg"] != c["images/train/000000.jpg"]
    )


def test_worker_count_does_not_change_bytes(tmp_path: Path) -> None:
    # 256 images is where the process pool takes over from in-process rendering
    generate(tmp_path / "one", SynthConfig(n=256, image_size=32, workers=1), progress=False)
    generate(tmp_path / "two", SynthConfig(n=256, image_size=32, workers=2), progress=False)
    assert files(tmp_path / "one") == files(tmp_path / "two")


def test_splits_files_and_summary(noisy_set: tuple[Path, dict]) -> None:
    out, summary = noisy_set
    train, heldout = rows(out, "train"), rows(out, "heldout")
    assert (summary["train"], summary["heldout"]) == (len(train), len(heldout)) == (240, 60)
    meta = json.loads((out / "synth.json").read_text())
    assert [tuple(c) for c in meta["heldout_combos"]] == list(HELDOUT_COMBOS)
    assert meta["config"]["noise"] == 0.25 and "workers" not in meta["config"]
    images = [r["image"] for r in train + heldout]
    assert len(set(images)) == 300 and all((out / p).is_file() for p in images)
    with Image.open(out / images[0]) as im:
        assert im.format == "JPEG" and im.size == (64, 64)
    n_objects = Counter(len(r["objects"]) for r in train + heldout)
    assert 0.55 < n_objects[2] / 300 < 0.85 and n_objects[1] > 0  # two_object_prob 0.7


def test_heldout_combos_never_in_train_and_in_every_heldout_scene(noisy_set: tuple[Path, dict]) -> None:
    out, _ = noisy_set
    for r in rows(out, "train"):
        assert not combos(r["objects"]) & HELD
        for text in (r["caption"], r["clean_caption"]):
            assert not combos(parse_caption(text)[0]) & HELD, text
    for r in rows(out, "heldout"):
        assert combos(r["objects"]) & HELD, r["caption"]


def test_noise_fraction_is_respected_and_recorded(noisy_set: tuple[Path, dict]) -> None:
    out, summary = noisy_set
    train = rows(out, "train")
    noisy = [r for r in train if r["noisy"]]
    assert len(noisy) == summary["noisy"] == round(0.25 * 240)
    clean_captions = {r["clean_caption"] for r in train}
    for r in train:
        assert r["clean_caption"] == caption_for(r["objects"], r["relation"])
        if r["noisy"]:
            assert r["caption"] != r["clean_caption"] and r["caption"] in clean_captions
        else:
            assert r["caption"] == r["clean_caption"]
    assert not any(r["noisy"] or r["caption"] != r["clean_caption"] for r in rows(out, "heldout"))


def test_noise_keeps_the_images(tmp_path: Path) -> None:
    generate(tmp_path / "clean", SynthConfig(n=20), progress=False)
    generate(tmp_path / "noisy", SynthConfig(n=20, noise=0.5), progress=False)
    clean, noisy = files(tmp_path / "clean"), files(tmp_path / "noisy")
    assert all(clean[k] == noisy[k] for k in clean if k.startswith("images/"))
    assert clean["train.jsonl"] != noisy["train.jsonl"]


def test_captions_parse_back_to_the_structured_fields(noisy_set: tuple[Path, dict]) -> None:
    out, _ = noisy_set
    for r in rows(out, "train") + rows(out, "heldout"):
        assert parse_caption(r["clean_caption"]) == (r["objects"], r["relation"])
        negatives = hard_negative_captions(r)
        assert r["clean_caption"] not in negatives and len(negatives) >= 3
        if len(r["objects"]) == 2:  # distinct colours and shapes: swapping either changes the caption
            a, b = r["objects"]
            assert a["color"] != b["color"] and a["shape"] != b["shape"]
    assert caption_for([{"color": "red", "size": "small", "shape": "circle"}], None) == "a small red circle"
    with pytest.raises(ValueError):
        parse_caption("a small red circle next to a dog")


TWO = {
    "objects": [
        {"color": "red", "size": "small", "shape": "circle"},
        {"color": "blue", "size": "large", "shape": "square"},
    ],
    "relation": "left of",
}


def test_hard_negatives_of_two_objects() -> None:
    truth = caption_for(TWO["objects"], TWO["relation"])
    assert truth == "a small red circle to the left of a large blue square"
    negatives = hard_negative_captions(TWO)
    assert "a small blue circle to the left of a large red square" in negatives  # colours swapped
    assert "a small red circle to the right of a large blue square" in negatives  # relation reversed
    assert len(negatives) == 4 and truth not in negatives and len(set(negatives)) == 4
    swaps = [c for c in negatives if "left" in c]
    assert len(swaps) == 3
    for c in swaps:  # a binding swap uses exactly the true caption's words
        assert Counter(c.split()) == Counter(truth.split())


def test_hard_negatives_skip_equal_attributes_and_avoid_combos() -> None:
    same_size = {"objects": [dict(o, size="large") for o in TWO["objects"]], "relation": "above"}
    assert len(hard_negative_captions(same_size)) == 3  # swapping equal sizes would give back the truth
    # swapping colours or shapes both make a "red square": avoiding it leaves the size swap and the relation
    assert hard_negative_captions(TWO, avoid=[("red", "square")]) == [
        "a large red circle to the left of a small blue square",
        "a small red circle to the right of a large blue square",
    ]


def test_hard_negatives_of_one_object_change_one_attribute() -> None:
    row = {"objects": [{"color": "green", "size": "large", "shape": "triangle"}], "relation": None}
    for rng in (None, random.Random(0)):
        negatives = hard_negative_captions(row, rng)
        assert len(negatives) == 3
        for c in negatives:
            (obj,), relation = parse_caption(c)
            assert relation is None and sum(obj[k] != row["objects"][0][k] for k in obj) == 1
    assert hard_negative_captions(row) == hard_negative_captions(row)  # no rng: deterministic
    held = hard_negative_captions(
        {"objects": [{"color": "red", "size": "small", "shape": "square"}]}, avoid=HELD
    )
    assert all(not combos(parse_caption(c)[0]) & HELD for c in held) and len(held) == 3


def test_scene_key_ignores_wording_but_not_content() -> None:
    flipped = scene_key(TWO["objects"][::-1], "right of")
    assert scene_key(TWO["objects"], "left of") == flipped  # "B right of A" shows what "A left of B" shows
    for negative in hard_negative_captions(TWO):  # so no hard negative is secretly true
        assert scene_key(*parse_caption(negative)) != flipped


def test_swap_attributes_draws_one_hard_negative() -> None:
    rng = random.Random(1)
    drawn = {swap_attributes(TWO["objects"], TWO["relation"], rng) for _ in range(50)}
    assert drawn == set(hard_negative_captions(TWO))


def _centroid(img: np.ndarray, color: str) -> np.ndarray:
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    dist = np.linalg.norm(img[:, :, None, :] - palette[None, None], axis=-1)  # (H, W, n_colors)
    saturated = img.max(-1) - img.min(-1) > 90  # shapes are saturated, the clutter is grey
    ys, xs = np.nonzero((dist.argmin(-1) == list(COLORS).index(color)) & saturated)
    assert len(xs) > 20, f"no {color} pixels"
    return np.array([xs.mean(), ys.mean(), len(xs)])


def test_images_show_the_relation_and_the_sizes(noisy_set: tuple[Path, dict]) -> None:
    out, _ = noisy_set
    axis = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
    areas: dict[tuple[str, str], list[float]] = {}
    for r in rows(out, "train"):
        img = np.asarray(Image.open(out / r["image"]).convert("RGB"), dtype=np.float32)
        cents = [_centroid(img, o["color"]) for o in r["objects"]]
        for o, c in zip(r["objects"], cents, strict=True):
            areas.setdefault((o["shape"], o["size"]), []).append(c[2])
        if r["relation"]:
            k, sign = axis[r["relation"]]
            along = cents[0][k] - cents[1][k]
            across = abs(cents[0][1 - k] - cents[1][1 - k])
            assert np.sign(along) == sign and abs(along) > 2.5 * across, (r["clean_caption"], cents)
    for shape in synth.SHAPES:  # pixel areas: ~(0.40 / 0.18)^2 ~ 5x apart, whatever the jitter
        assert min(areas[shape, "large"]) > 2.5 * max(areas[shape, "small"]), shape


def test_layout_keeps_boxes_inside_and_apart() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        sides = [int(rng.choice([23, 58])), int(rng.choice([21, 55]))]
        relation = str(rng.choice(list(synth.RELATIONS)))
        corners = synth._layout(rng, sides, relation, 128)
        for (x, y), s in zip(corners, sides, strict=True):
            assert 0 <= x and x + s <= 128 and 0 <= y and y + s <= 128
        k = 0 if relation in ("left of", "right of") else 1
        first, second = (0, 1) if relation in ("left of", "above") else (1, 0)
        assert corners[first][k] + sides[first] < corners[second][k]  # disjoint along the relation's axis


@pytest.mark.parametrize(
    "cfg",
    [SynthConfig(n=1), SynthConfig(noise=1.5), SynthConfig(heldout_fraction=0.0), SynthConfig(image_size=16)],
)
def test_bad_settings_are_user_errors(tmp_path: Path, cfg: SynthConfig) -> None:
    with pytest.raises(UserError):
        generate(tmp_path / "out", cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_a_foreign_non_empty_folder_and_regenerates_its_own(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        generate(tmp_path, SynthConfig(n=10), progress=False)
    out = tmp_path / "set"
    generate(out, SynthConfig(n=20), progress=False)
    generate(out, SynthConfig(n=10), progress=False)  # smaller re-run: no stale images left behind
    assert len(list((out / "images").rglob("*.jpg"))) == 10 and (tmp_path / "mine.txt").exists()

"""Visual questions about `data synth` scenes: colour, shape, size, count and relation, answered in one word or
yes/no, for every image of both splits (vqa_train.jsonl, vqa_heldout.jsonl: the held-out split's scenes hold the
colour-shape combinations training never shows)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from retrieval.data.synth import RELATIONS, REVERSED
from retrieval.errors import UserError

KINDS = ("color", "shape", "size", "count", "relation")
_NUMBERS = {1: "one", 2: "two"}
_OTHER_AXIS = {
    "left of": ("above", "below"),
    "right of": ("above", "below"),
    "above": ("left of", "right of"),
    "below": ("left of", "right of"),
}


def questions_for(row: dict[str, Any], rng: random.Random) -> list[dict[str, str]]:
    """One question of each kind that fits the scene (relation needs two objects), as rows with image,
    question, answer and kind."""
    objects, relation = row["objects"], row.get("relation")
    k = rng.randrange(len(objects))
    obj = objects[k]
    out = [
        ("color", f"What colour is the {obj['shape']}?", obj["color"]),
        ("shape", f"What shape is the {obj['color']} object?", obj["shape"]),
        ("size", f"Is the {obj['color']} {obj['shape']} small or large?", obj["size"]),
        ("count", "How many shapes are there?", _NUMBERS[len(objects)]),
    ]
    if relation is not None:
        a, b = (objects[0], objects[1]) if rng.random() < 0.5 else (objects[1], objects[0])
        true = relation if a is objects[0] else REVERSED[relation]
        asked, answer = true, "yes"
        draw = rng.random()
        if draw < 1 / 4:
            asked, answer = REVERSED[true], "no"
        elif draw < 1 / 2:
            asked, answer = rng.choice(_OTHER_AXIS[true]), "no"
        out.append(("relation", f"Is the {a['shape']} {RELATIONS[asked]} the {b['shape']}?", answer))
    return [{"image": row["image"], "question": q, "answer": a, "kind": kind} for kind, q, a in out]


def write_vqa(synth_dir: str | Path, seed: int = 0) -> dict[str, int]:
    """Write vqa_train.jsonl and vqa_heldout.jsonl beside a synth output's train/heldout.jsonl; returns counts."""
    folder = Path(synth_dir)
    rng = random.Random(seed + 1)
    counts = {}
    for split in ("train", "heldout"):
        source = folder / f"{split}.jsonl"
        if not source.is_file():
            raise UserError(f"{source}: missing; run `retrieval data synth` first")
        rows, seen = [], set()
        for line in source.read_text().splitlines():
            row = json.loads(line)
            if row["image"] in seen:  # several captions of one image: one set of questions
                continue
            seen.add(row["image"])
            rows.extend(questions_for(row, rng))
        with open(folder / f"vqa_{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        counts[split] = len(rows)
    return counts

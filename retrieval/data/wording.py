"""Free wordings of a synth scene, for datasets with several differently worded captions per image (COCO-style).

A wording is a pair of templates: how to name one object, and how to join two objects by a relation. Every wording
says the same thing, so a scene's captions are true paraphrases, and a false caption (attributes swapped, relation
reversed) rendered in the same wording differs from the truth only in what it says. `data synth --captions N
--wording varied` draws N different wordings per image from WORDINGS; benchmarks keep families of their own that
nothing here was tuned on.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

# relation -> the same fact said from the other object: "A left of B" is "B right of A"
_CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class Wording:
    thing: str  # one object: {size} {color} {shape}
    relations: dict[str, str]  # relation -> template with {a} and {b}
    alone: str = "{a}"  # a one-object scene
    converse: bool = False  # name the second object first, with the converse relation

    def render(self, objects: Sequence[dict[str, str]], relation: str | None) -> str:
        phrases = [self.thing.format(**o) for o in objects]
        if len(objects) == 1:
            return self.alone.format(a=phrases[0])
        if self.converse:
            phrases, relation = phrases[::-1], _CONVERSE[relation]
        return self.relations[relation].format(a=phrases[0], b=phrases[1])


def _relations(left: str, right: str, above: str, below: str) -> dict[str, str]:
    return {"left of": left, "right of": right, "above": above, "below": below}


WORDINGS: tuple[Wording, ...] = (
    Wording(
        "a {size} {color} {shape}",
        _relations("{a} left of {b}", "{a} right of {b}", "{a} over {b}", "{a} under {b}"),
    ),
    Wording(
        "a {color} {shape}, {size},",
        _relations(
            "{a} on the left of {b}", "{a} on the right of {b}", "{a} on top of {b}", "{a} beneath {b}"
        ),
        alone="a picture of {a}",
    ),
    Wording(
        "one {size} {color} {shape}",
        _relations("{a} is left of {b}", "{a} is right of {b}", "{a} is above {b}", "{a} is below {b}"),
        alone="there is {a}",
        converse=True,
    ),
    Wording(
        "a {size} {shape} in {color}",
        _relations(
            "there is {a} to the left of {b}",
            "there is {a} to the right of {b}",
            "there is {a} above {b}",
            "there is {a} below {b}",
        ),
        alone="{a} on a cluttered background",
    ),
    Wording(
        "the {size} {color} {shape}",
        _relations(
            "{a} sits left of {b}", "{a} sits right of {b}", "{a} sits over {b}", "{a} sits under {b}"
        ),
        alone="only {a}",
    ),
    Wording(
        "a {color} {shape} that is {size}",
        _relations(
            "{a} and to its right {b}",
            "{a} and to its left {b}",
            "{a} and below it {b}",
            "{a} and above it {b}",
        ),
        alone="a photo showing {a}",
    ),
)


def varied_wordings(n: int, rng: random.Random) -> list[int]:
    """n indices into WORDINGS, all different while n <= len(WORDINGS)."""
    order = rng.sample(range(len(WORDINGS)), len(WORDINGS))
    return [order[k % len(order)] for k in range(n)]

"""Recolouring: hues and colour words move together, nothing else moves."""

import open_clip
import pytest
import torch

from retrieval.data.grouping import group_pairs
from retrieval.data.pairs import Pair
from retrieval.data.recolour import NAMES, choose, colours_named, draw_permutations, recolour, swap_words
from retrieval.data.synth import COLORS
from retrieval.errors import UserError
from retrieval.train.data import BatchPlan, TrainData


def _swap(a: str, b: str) -> list[int]:
    perm = list(range(len(NAMES)))
    i, j = NAMES.index(a), NAMES.index(b)
    perm[i], perm[j] = j, i
    return perm


def _palette() -> torch.Tensor:
    return torch.tensor([list(v) for v in COLORS.values()], dtype=torch.uint8).T[
        None, :, :, None
    ]  # (1,3,6,1)


def test_a_swap_moves_every_synth_colour_to_the_one_its_word_becomes():
    pixels = _palette()
    for src in COLORS:
        for dst in COLORS:
            out = recolour(pixels, [_swap(src, dst)])[0, :, list(COLORS).index(src), 0].tolist()
            nearest = min(
                COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLORS[c], out, strict=True))
            )
            assert nearest == dst, (src, dst, out)
            assert swap_words(f"a {src} circle", _swap(src, dst)) == f"a {dst} circle"


def test_identity_grey_pixels_and_rows_without_a_permutation_are_unchanged():
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    identity = list(range(len(NAMES)))
    assert (recolour(pixels, [identity] * 3).int() - pixels.int()).abs().max() <= 1  # HSV round trip
    grey = torch.full((1, 3, 4, 4), 128, dtype=torch.uint8)
    assert torch.equal(recolour(grey, [_swap("red", "blue")]), grey)
    out = recolour(pixels, [None, _swap("red", "green"), None])
    assert (
        torch.equal(out[0], pixels[0])
        and torch.equal(out[2], pixels[2])
        and not torch.equal(out[1], pixels[1])
    )


def test_words_keep_their_case_and_only_whole_colour_words_change():
    perm = _swap("red", "blue")
    assert (
        swap_words("Red bus, BLUE sky, a reddish barn, red.", perm)
        == "Blue bus, RED sky, a reddish barn, blue."
    )
    assert (
        swap_words(swap_words("a red cube left of a blue ball", perm), perm)
        == "a red cube left of a blue ball"
    )


def test_permutations_move_only_the_colours_the_captions_use():
    among = colours_named(["a red circle", "a Green square", "nothing"])
    assert [NAMES[i] for i in among] == ["red", "green"]
    perms = draw_permutations(200, 0.5, torch.Generator().manual_seed(0), among)
    drawn = [p for p in perms if p is not None]
    assert 60 < len(drawn) < 140
    fixed = [i for i in range(len(NAMES)) if i not in among]
    assert all(p[i] == i for p in drawn for i in fixed)
    assert any(p[among[0]] == among[1] for p in drawn)


def test_auto_turns_on_for_colour_captions_and_off_for_photo_captions():
    assert choose("auto", 0.5, ["a red circle", "a blue square", "a cat"])[0] == 0.5
    prob, why = choose(
        "auto",
        0.5,
        ["a dog on a red sofa", "a blue car", "a man", "a house", "a cat", "two cats", "a bus", "a tree"],
    )
    assert prob == 0 and "25%" in why
    assert choose("on", 0.5, ["a cat"])[0] == 0  # nothing to permute
    assert choose("off", 0.5, ["a red circle", "a blue square"])[0] == 0
    with pytest.raises(UserError, match="recolour='maybe'"):
        choose("maybe", 0.5, [])


def test_batches_recolour_the_image_and_its_caption_together():
    colours = {"red": (215, 35, 35), "blue": (40, 80, 225)}
    pairs = [Pair(f"{i}.png", f"{i}.png", f"a {c} square", {}) for i, c in enumerate(colours)]
    pairs += [Pair(f"{i + 2}.png", f"{i + 2}.png", f"a {c} circle", {}) for i, c in enumerate(colours)]
    groups = group_pairs(pairs)

    class Images:
        cache = torch.stack(
            [torch.tensor(colours[p.caption.split()[1]]).view(3, 1, 1).expand(3, 4, 4) for p in pairs]
        )
        cache = cache.to(torch.uint8)  # (4, 3, 4, 4) one flat colour per image
        valid = torch.ones(4, dtype=torch.bool)

    plan = BatchPlan(Images.valid, batch_size=4, seed=0)
    tokenizer = open_clip.get_tokenizer("test-micro")
    data = TrainData(groups, Images, lambda t: tokenizer(t), plan, recolour_prob=1.0)
    repeated = 0
    for step in range(8):
        batch = data.batch(step)
        texts = [tokenizer.decode(t.tolist()) for t in batch.tokens]
        for pixels, text in zip(batch.pixels, texts, strict=True):
            named = next(c for c in colours if c in text)
            rgb = pixels[:, 0, 0].tolist()
            nearest = min(
                colours, key=lambda c: sum((a - b) ** 2 for a, b in zip(colours[c], rgb, strict=True))
            )
            assert nearest == named, (text, rgb)
        assert len(set(batch.ids.tolist())) == len(set(texts))  # positives: the same text
        repeated += len(set(texts)) < 4  # all four images in every batch: a repeat means one was recoloured
    assert repeated > 0


def test_vlm_copies_answer_in_the_colour_their_features_show():
    import numpy as np

    from retrieval.train.vlm_data import Recoloured

    class Tower:  # the "features" of an image: its mean pixel, as normalised
        image = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}

        def features(self, x):
            return x.mean((2, 3))  # (N, 3)

    palette = {"red": (215, 35, 35), "green": (40, 170, 60), "blue": (40, 80, 225)}
    pixels = torch.stack([torch.tensor(v).view(3, 1, 1).expand(3, 4, 4) for v in palette.values()]).to(
        torch.uint8
    )
    feats = Tower().features(pixels.float() / 255)
    among = colours_named(list(palette))
    copies = Recoloured(Tower(), pixels, feats, among, variants=4, seed=0)
    assert copies.feats.shape == (5, 3, 3)
    chats = [[("What colour is the shape?", name)] for name in palette]
    index = torch.arange(3)
    moved = 0
    for step in range(10):
        got, drawn = copies.draw(index, chats, 1.0, np.random.default_rng(step))
        for f, chat in zip(got, drawn, strict=True):
            rgb = (f * 255).tolist()
            nearest = min(
                palette, key=lambda c: sum((a - b) ** 2 for a, b in zip(palette[c], rgb, strict=True))
            )
            assert chat[0][1] == nearest
        moved += [c[0][1] for c in drawn] != list(palette)
    assert moved > 0

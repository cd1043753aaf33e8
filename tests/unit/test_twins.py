import open_clip
import pytest
import torch

from retrieval.data.pairs import Pair
from retrieval.train.data import BatchPlan, TrainData
from retrieval.train.twins import caption_id, choose_sources, mirror, mirror_pixels


def test_mirror_swaps_the_words_of_the_flipped_axis_only():
    assert mirror("a red circle to the left of a blue square") == (
        "a red circle to the right of a blue square",
        True,
        False,
    )
    assert mirror("a red circle above a blue square") == ("a red circle below a blue square", False, True)
    # vertical off: an above/below caption is only mirrored left-right, which leaves it true as it is
    assert mirror("a red circle above a blue square", vertical=False) == (
        "a red circle above a blue square",
        True,
        False,
    )
    assert mirror("Left: a TOP hat, rightmost a bottom shelf") == (
        "Right: a BOTTOM hat, leftmost a top shelf",
        True,
        True,
    )
    # a caption naming no direction: a plain horizontal mirror, caption unchanged; words inside words untouched
    assert mirror("a bright stoplight") == ("a bright stoplight", True, False)


def test_mirror_pixels_flips_the_named_axes():
    x = torch.arange(2 * 3 * 4).view(2, 3, 4)  # (C, H, W)
    assert torch.equal(mirror_pixels(x, True, False)[:, :, 0], x[:, :, -1])
    assert torch.equal(mirror_pixels(x, False, True)[:, 0], x[:, -1])
    assert torch.equal(mirror_pixels(x, False, False), x)


def test_sources_prefer_rows_whose_twin_differs_and_follow_the_seed():
    captions = ["a cat", "a cat left of a dog", "a dog", "a dog above a cat", "a bird"]
    got = choose_sources(captions, 3, seed=5)
    assert set(got[:2]) == {1, 3} and got[2] in (0, 2, 4) and len(set(got)) == 3
    assert got == choose_sources(captions, 3, seed=5)
    assert choose_sources(captions, 2, seed=5, vertical=False)[0] == 1
    assert sorted(choose_sources(captions, 9, seed=1)) == [0, 1, 2, 3, 4]


def test_twin_ids_reuse_the_data_and_are_stable_for_new_captions():
    known = {"a cat left of a dog": 0, "a cat right of a dog": 1}
    assert caption_id("A cat  right of a dog", known) == 1
    new = caption_id("a dog right of a cat", known)
    assert new not in known.values() and new == caption_id("a dog right of a cat", dict(known))


@pytest.fixture
def twin_data():
    captions = [
        "a red circle to the left of a blue square",
        "a red circle to the right of a blue square",
        "a green cross above a red circle",
        "a small green cross",
    ] * 4
    pairs = [Pair(image=f"{i}.jpg", caption=c, key=str(i)) for i, c in enumerate(captions)]

    class Images:
        cache = torch.randint(0, 255, (len(pairs), 3, 8, 8), dtype=torch.uint8)

    plan = BatchPlan(torch.ones(len(pairs), dtype=torch.bool), batch_size=6, seed=0)
    tokenizer = open_clip.get_tokenizer("test-micro")
    return TrainData(pairs, Images, tokenizer, plan, text_negatives=True, twins=3), Images.cache, tokenizer


def test_batches_end_with_mirror_twins_of_their_own_rows(twin_data):
    data, cache, tokenizer = twin_data
    batch = data.batch(2)
    idx = data.plan(2)  # (6,)
    assert batch.pixels.shape[0] == batch.tokens.shape[0] == batch.caption_ids.shape[0] == 9
    assert torch.equal(batch.pixels[:6], cache[idx])
    for row in range(6, 9):
        source = next(
            j
            for j in range(6)
            if torch.equal(batch.pixels[row], cache[idx[j]].flip(-1))
            or torch.equal(batch.pixels[row], cache[idx[j]].flip(-2))
        )
        twin, h, v = mirror(data.captions[idx[source]])
        assert torch.equal(batch.pixels[row], mirror_pixels(cache[idx[source]], h, v))
        assert torch.equal(batch.tokens[row], tokenizer([twin])[0])
        assert int(batch.caption_ids[row]) == caption_id(twin, data.known)
    # the twin of "left of" is the data's own "right of" caption: the same id, so a positive of those rows
    assert int(data.ids[1]) == caption_id(mirror(data.captions[0])[0], data.known)
    assert batch.negative_tokens.shape == batch.tokens.shape  # twins get rule-made negatives too
    again = data.batch(2)  # a resumed run rebuilds the same batch
    assert torch.equal(again.pixels, batch.pixels) and torch.equal(again.caption_ids, batch.caption_ids)

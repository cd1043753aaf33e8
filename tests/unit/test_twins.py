import torch

from retrieval.train.twins import mirror, mirror_pixels


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


def test_mirrored_batches_flip_the_image_and_swap_its_direction_words():
    import open_clip

    from retrieval.data.grouping import group_pairs
    from retrieval.data.pairs import Pair
    from retrieval.train.data import BatchPlan, TrainData

    pairs = [Pair(f"{i}.png", f"{i}.png", f"a red square left of a blue circle {i}", {}) for i in range(4)]
    groups = group_pairs(pairs)

    class Images:  # the left half red, the right half blue
        cache = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
        cache[:, 0, :, 0] = 200
        cache[:, 2, :, 1] = 200
        valid = torch.ones(4, dtype=torch.bool)

    tokenizer = open_clip.get_tokenizer("test-micro")
    data = TrainData(groups, Images, tokenizer, BatchPlan(Images.valid, 4, 0), mirror=(0.5, False))
    flipped = kept = 0
    for step in range(6):
        batch = data.batch(step)
        for pixels, tokens in zip(batch.pixels, batch.tokens, strict=True):
            text = tokenizer.decode(tokens.tolist())
            red_on_left = bool(pixels[0, 0, 0] == 200)
            assert red_on_left == ("left of" in text), text
            flipped += not red_on_left
            kept += red_on_left
    assert flipped and kept

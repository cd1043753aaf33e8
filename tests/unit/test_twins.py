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

"""Fusion encoder and ITM composition: shapes, masking, negatives respect positives, a toy task it must learn."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from retrieval.models.fusion import FusionConfig, FusionEncoder, build_fusion
from retrieval.train.itm import itm_forward

# patch tokens only: the pooled-feature token has its own test below
CFG = FusionConfig(width=32, layers=2, heads=2, text_width=16, image_width=24, global_token=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core box they run 10-40x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(b: int = 3, length: int = 5, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(b, length, CFG.text_width, generator=g)  # (B, L, Dt)
    mask = torch.ones(b, length, dtype=torch.bool)  # (B, L)
    mask[0, 3:] = False
    mask[2, 1:] = False
    image = torch.randn(b, n, CFG.image_width, generator=g)  # (B, N, Di)
    return text, mask, image


def test_shapes_and_finite() -> None:
    torch.manual_seed(0)
    fusion = build_fusion(CFG)
    text, mask, image = _inputs()
    out = fusion(text, mask, image)
    assert out.shape == (3, 5, CFG.width)
    assert torch.isfinite(out).all()
    assert (out[~mask] == 0).all() and (out[mask].abs().sum(-1) > 0).all()
    logits = fusion.itm_logits(text, mask, image)
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()


def test_padded_tokens_do_not_change_output() -> None:
    torch.manual_seed(0)
    fusion = build_fusion(CFG).eval()
    text, mask, image = _inputs()
    changed = text.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), CFG.text_width) * 100
    assert torch.allclose(fusion(text, mask, image), fusion(changed, mask, image), atol=1e-5)
    # ...while the same change to real tokens does alter it, so the check above is not vacuous.
    unmasked = torch.ones_like(mask)
    assert not torch.allclose(fusion(text, unmasked, image), fusion(changed, unmasked, image), atol=1e-3)
    # The image really is attended to.
    assert not torch.allclose(fusion(text, mask, image), fusion(text, mask, image.flip(0)), atol=1e-3)


def test_bad_inputs_and_configs_fail_loudly() -> None:
    fusion = build_fusion(CFG)
    text, mask, image = _inputs()
    left_padded = mask.clone()
    left_padded[1, 0] = False
    with pytest.raises(ValueError, match="right padding"):
        fusion(text, left_padded, image)
    gap = mask.clone()
    gap[1, 2] = False  # a hole inside the text: the last real token would be misplaced
    with pytest.raises(ValueError, match="right padding"):
        fusion(text, gap, image)
    with pytest.raises(ValueError, match="readout"):
        build_fusion(FusionConfig(readout="mean"))
    with pytest.raises(ValueError, match="text_width|image"):
        fusion(text[..., :8], mask, image)
    with pytest.raises(ValueError, match="divisible"):
        build_fusion(FusionConfig(width=30, heads=4))
    with pytest.raises(ValueError, match="dropout"):
        build_fusion(FusionConfig(dropout=1.5))


class _SpyFusion(FusionEncoder):
    """Records which (image, text) pairs it was asked to score."""

    def itm_logits(self, text_tokens, text_mask, image_tokens, image_index=None, image_global=None):
        images = image_tokens if image_index is None else image_tokens[image_index]
        self.seen = (text_tokens.detach(), images.detach())
        return super().itm_logits(text_tokens, text_mask, image_tokens, image_index, image_global)


def test_itm_forward_negatives_respect_positive_mask() -> None:
    torch.manual_seed(0)
    b = 4
    fusion = _SpyFusion(CFG)
    text, _, image = _inputs(b=b)
    mask = torch.ones(b, 5, dtype=torch.bool)
    # Only one non-positive per row: image i's negative text must be text (i + 1) % b, and text j's
    # negative image must be image (j - 1) % b. The diagonal is left False on purpose: it is always positive.
    positives = torch.ones(b, b, dtype=torch.bool)
    positives[torch.arange(b), torch.arange(b)] = False
    positives[torch.arange(b), (torch.arange(b) + 1) % b] = False
    sim = torch.randn(b, b) * 10
    for _ in range(20):
        out = itm_forward(fusion, text, mask, image, sim, sim, positives, generator=torch.Generator())
        texts, images = fusion.seen
        assert texts.shape[0] == images.shape[0] == 3 * b
        assert torch.equal(texts[:b], text) and torch.equal(images[:b], image)
        assert torch.equal(images[b : 2 * b], image)
        assert torch.equal(texts[b : 2 * b], text[(torch.arange(b) + 1) % b])
        assert torch.equal(texts[2 * b :], text)
        assert torch.equal(images[2 * b :], image[(torch.arange(b) - 1) % b])
    assert set(out) == {"itm", "itm_acc"} and torch.isfinite(out["itm"])
    out["itm"].backward()
    assert all(p.grad is not None for p in fusion.parameters())
    with pytest.raises(ValueError, match="in-batch"):
        itm_forward(fusion, text, mask, image, torch.randn(b, 2 * b), sim, positives)


def test_itm_forward_skips_rows_without_a_negative() -> None:
    """Rows whose in-batch candidates are all positives (images sharing a caption) get no mined negative; the
    step still runs (bootstrapped data made the sampler raise here)."""
    torch.manual_seed(0)
    b = 4
    fusion = _SpyFusion(CFG)
    text, _, image = _inputs(b=b)
    mask = torch.ones(b, 5, dtype=torch.bool)
    positives = torch.zeros(b, b, dtype=torch.bool)
    positives[:3, :3] = True  # images 0-2 share one caption: only image/text 3 is a negative for them
    out = itm_forward(fusion, text, mask, image, torch.randn(b, b), torch.randn(b, b), positives)
    assert torch.isfinite(out["itm"])
    all_pos = itm_forward(
        fusion, text, mask, image, torch.randn(b, b), torch.randn(b, b), torch.ones(b, b).bool()
    )
    texts, _ = fusion.seen
    assert texts.shape[0] == b and torch.isfinite(all_pos["itm"])


def _toy_batch(b: int, g: torch.Generator, concepts: tuple[torch.Tensor, torch.Tensor]):
    """Match iff the image's concept equals the text's concept; half the pairs match."""
    text_protos, image_protos = concepts
    k = text_protos.shape[0]
    c_img = torch.randint(k, (b,), generator=g)
    shift = torch.randint(1, k, (b,), generator=g)
    match = torch.rand(b, generator=g) < 0.5
    c_txt = torch.where(match, c_img, (c_img + shift) % k)
    text = text_protos[c_txt][:, None] + 0.3 * torch.randn(b, 4, CFG.text_width, generator=g)  # (B, 4, Dt)
    image = image_protos[c_img][:, None] + 0.3 * torch.randn(b, 3, CFG.image_width, generator=g)  # (B, 3, Di)
    mask = torch.ones(b, 4, dtype=torch.bool)
    mask[: b // 2, 2:] = False  # some padding, as in real batches
    text = text.masked_fill(~mask[..., None], 7.0)
    return text, mask, image, match.long()


def test_itm_learns_a_toy_matching_rule() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    concepts = (torch.randn(6, CFG.text_width, generator=g), torch.randn(6, CFG.image_width, generator=g))
    fusion = build_fusion(CFG)
    opt = torch.optim.AdamW(fusion.parameters(), lr=3e-3)
    for _ in range(200):
        text, mask, image, label = _toy_batch(64, g, concepts)
        loss = torch.nn.functional.cross_entropy(fusion.itm_logits(text, mask, image), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    fusion.eval()
    with torch.no_grad():
        text, mask, image, label = _toy_batch(512, g, concepts)
        acc = (fusion.itm_logits(text, mask, image).argmax(1) == label).float().mean().item()
    assert acc > 0.9, acc


def test_text_tower_on_trimmed_padding_gives_the_full_length_outputs() -> None:
    """Training runs the text tower and fusion on the batch's longest text only; that must be exact."""
    import open_clip

    from retrieval.models.albef import PAD_ID, encode_text_tokens
    from retrieval.models.encoders import create_clip

    clip = create_clip("test-micro", "none")[0].eval()
    text = open_clip.get_tokenizer("test-micro")(
        ["a red circle", "a small blue square above a large red cross"]
    )
    full_pooled, full_tokens = encode_text_tokens(clip, text)
    pooled, tokens = encode_text_tokens(clip, text, trim=True)
    longest = int((text != PAD_ID).sum(1).max())
    assert tokens.shape[1] == longest < text.shape[1]
    torch.testing.assert_close(pooled, full_pooled)
    torch.testing.assert_close(tokens, full_tokens[:, :longest])
    torch.testing.assert_close(pooled, clip.encode_text(text))  # and both are OpenCLIP's own encode_text


def test_shared_image_keys_values_match_per_row_images_and_multihead_attention() -> None:
    torch.manual_seed(0)
    fusion = build_fusion(CFG).eval()
    text, mask, image = _inputs(b=3)
    index = torch.tensor([2, 0, 0])
    shared = fusion(text, mask, image, index)  # (3, L, W): keys/values projected once per image
    copied = fusion(text, mask, image[index])  # the same images, one copy per row
    assert torch.allclose(shared, copied, atol=1e-5)
    layer = fusion.blocks[0]
    h, img = torch.randn(3, 5, CFG.width), torch.randn(3, 4, CFG.width)
    reference = layer.cross_attn(h, img, img, need_weights=False)[0]
    assert torch.allclose(layer._cross(h, img, None), reference, atol=1e-5)
    with pytest.raises(ValueError, match="image_index"):
        fusion(text, mask, image, torch.tensor([0, 3, 1]))


def test_rows_grouped_per_image_give_the_per_row_copies_outputs_and_gradients() -> None:
    """Cross-attention lays each image's rows end to end against that image alone (padded to the busiest
    image); outputs and gradients must equal scoring every row against its own copy of the image."""
    torch.manual_seed(3)
    fusion = build_fusion(CFG).train()
    text, mask, image = _inputs(b=9)
    index = torch.tensor([4, 0, 4, 4, 2, 0, 4, 8, 2])  # uneven: 4 rows on image 4, none on 1, 3, 5, 6, 7
    grouped = fusion.itm_logits(text, mask, image, index)
    grouped.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in fusion.named_parameters()}
    fusion.zero_grad()
    copied = fusion.itm_logits(text, mask, image[index])
    copied.square().sum().backward()
    torch.testing.assert_close(grouped, copied, atol=1e-5, rtol=1e-4)
    for name, p in fusion.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_itm_logits_with_a_first_row_only_last_layer_equal_the_full_pass() -> None:
    torch.manual_seed(1)
    fusion = build_fusion(CFG).eval()
    text, mask, image = _inputs(b=3)
    last = mask.sum(dim=1) - 1  # the default readout: each row's last real token (EOT)
    full = fusion.itm_head(fusion(text, mask, image)[torch.arange(3), last])  # every position, every layer
    assert torch.allclose(fusion.itm_logits(text, mask, image), full, atol=1e-5)
    first = build_fusion(dataclasses.replace(CFG, readout="first")).eval()
    first.load_state_dict(fusion.state_dict())
    assert torch.allclose(
        first.itm_logits(text, mask, image), fusion.itm_head(fusion(text, mask, image)[:, 0]), atol=1e-5
    )


@pytest.mark.parametrize("positions", [True, False])
def test_image_positions_make_the_fusion_see_where_things_are(positions: bool) -> None:
    """Cross-attention alone is blind to the order of the image tokens; with grid positions a mirrored image
    (same tokens, columns reversed) reads differently, which is what "left of" vs "right of" needs."""
    torch.manual_seed(0)
    fusion = build_fusion(dataclasses.replace(CFG, image_positions=positions)).eval()
    text, mask, _ = _inputs()
    image = torch.randn(3, 16, CFG.image_width)  # (B, 4 x 4 grid, Di), row-major
    mirrored = image.unflatten(1, (4, 4)).flip(2).flatten(1, 2)  # columns reversed
    same = torch.allclose(fusion(text, mask, image), fusion(text, mask, mirrored), atol=1e-5)
    assert same is not positions
    # a token count that is not a square grid (e.g. a class token kept) gets no positions, and still runs
    odd = torch.randn(3, 17, CFG.image_width)
    assert torch.allclose(fusion(text, mask, odd), fusion(text, mask, odd[:, torch.randperm(17)]), atol=1e-5)


def test_the_pooled_feature_token_is_read_per_image_and_required() -> None:
    """With global_token each image's pooled feature is one more key/value: changing it changes the match, the
    grid positions still reach the patch tokens, rows sharing an image see that image's feature, and a call
    without the features fails with the shape it needs."""
    torch.manual_seed(2)
    cfg = dataclasses.replace(CFG, global_token=True, global_width=8)
    fusion = build_fusion(cfg).eval()
    text, mask, _ = _inputs(b=3)
    image = torch.randn(3, 16, CFG.image_width)  # (B, 4 x 4 grid, Di)
    pooled = torch.randn(3, 8)  # (B, D)
    out = fusion.itm_logits(text, mask, image, image_global=pooled)
    assert not torch.allclose(
        out, fusion.itm_logits(text, mask, image, image_global=pooled.flip(0)), atol=1e-4
    )
    mirrored = image.unflatten(1, (4, 4)).flip(2).flatten(1, 2)
    assert not torch.allclose(out, fusion.itm_logits(text, mask, mirrored, image_global=pooled), atol=1e-4)
    index = torch.tensor([2, 0, 2])
    torch.testing.assert_close(
        fusion.itm_logits(text, mask, image, index, image_global=pooled),
        fusion.itm_logits(text, mask, image[index], image_global=pooled[index]),
        atol=1e-5,
        rtol=1e-4,
    )
    with pytest.raises(ValueError, match=r"image_global must be \(3, 8\); got None"):
        fusion.itm_logits(text, mask, image)
    plain = build_fusion(CFG)  # the option off: no parameters for it, and a feature passed is not read
    assert not any("global" in name for name, _ in plain.named_parameters())

"""Generated hard-negative captions: every rule makes a false caption, the vocabulary keeps them in-domain, and
the losses treat them as negatives only (never a positive, masked rows change nothing)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from retrieval.data.synth import HELDOUT_COMBOS, hard_negative_captions, parse_caption, scene_key
from retrieval.losses.contrastive import clip_loss
from retrieval.losses.distill import FeatureQueue, distilled_clip_loss
from retrieval.models.fusion import FusionConfig, build_fusion
from retrieval.train.itm import itm_forward
from retrieval.train.negatives import (
    Vocabulary,
    binding_candidates,
    candidates,
    negative_caption,
    negative_captions,
    relation_opposite,
    substituted,
    substitutes,
)

TWO = "a small red circle to the left of a large blue square"


def test_rules_cover_binding_and_relations_and_are_all_false() -> None:
    found = set(candidates(TWO))
    assert "a small blue circle to the left of a large red square" in found  # colours swapped
    assert "a large red circle to the left of a small blue square" in found  # sizes swapped
    assert "a small red square to the left of a large blue circle" in found  # head nouns swapped
    assert "a large blue square to the left of a small red circle" in found  # phrases swapped: direction
    assert {
        "a small red circle to the right of a large blue square",
        "a small red circle above a large blue square",
    } <= found
    # on synth captions the ground truth is known: no candidate may describe the same scene
    truth = scene_key(*parse_caption(TWO))
    assert all(scene_key(*parse_caption(c)) != truth for c in found)
    # and the evaluation's binding negatives are among them (the same kinds of edits, see the README caveat)
    row = {"objects": parse_caption(TWO)[0], "relation": parse_caption(TWO)[1]}
    assert set(hard_negative_captions(row)) <= found


def test_one_object_changes_an_attribute_and_unknown_captions_get_none() -> None:
    found = candidates("A Large  green cross")
    assert "a small green cross" in found and "a large red cross" in found
    assert "a large green cross" not in found
    assert candidates("a dog on a beach") == []
    assert negative_caption("a dog on a beach", random.Random(0)) is None


def test_vocabulary_keeps_only_phrases_the_data_has() -> None:
    train = [TWO, "a small blue circle below a large red triangle", "a large red square"]
    vocab = Vocabulary(train)
    allowed = [c for c in candidates(TWO) if vocab.allows(c)]
    assert (
        "a small blue circle to the left of a large red square" in allowed
    )  # "blue circle", "red square" seen
    assert "a small red circle below a large blue square" in allowed
    assert not vocab.allows("a small red circle to the left of a large green square")  # "green square" unseen


def _described(rng: random.Random) -> list[str]:
    """Three captions of one two-object image: over and above are synonyms (one image's captions say either),
    colours and shapes are alternatives (every caption of an image names the same ones)."""
    colours, shapes = (
        rng.sample(["red", "blue", "green", "pink"], 2),
        rng.choices(["circle", "square", "star"], k=2),
    )
    a, b = f"{colours[0]} {shapes[0]}", f"{colours[1]} {shapes[1]}"
    return [f"a {a} over a {b}", f"a {a} above a {b}", f"the {b} under the {a}"]


def test_substitutes_are_alternatives_learned_from_the_captions_never_synonyms() -> None:
    rng = random.Random(0)
    groups = [_described(rng) for _ in range(200)]
    table = substitutes(groups)
    assert set(table["red"]) == {"blue", "green", "pink"}
    assert set(table["circle"]) == {"square", "star"}
    assert "above" not in table.get("over", ())  # two captions of one image say either: synonyms
    # one caption per image: nothing tells a synonym from an alternative, so no substitutes at all
    assert substitutes([[g[0]] for g in groups] + [[g[1]] for g in groups]) == {}
    assert "no word substitutes" in Vocabulary([g[0] for g in groups], [[g[0]] for g in groups]).describe()

    caption = "a red circle over a blue square"
    out = substituted(caption, table)
    assert out == substituted(caption, table)  # stable: a resumed run and every worker draw the same
    assert {c.split()[1] for c in out if c.split()[2:] == caption.split()[2:]} <= {"green", "pink"}
    assert all(len(c.split()) == len(caption.split()) and c != caption for c in out)
    assert len(out) == 4  # red, circle, blue, square each replaced once
    # the refinement's binding candidates include them and keep the relation word in place
    found = binding_candidates(caption, table)
    assert set(out) <= set(found) and all(" over " in c for c in found)
    # the joint run's negatives draw them half the time when the vocabulary allows them
    vocab = Vocabulary([c for g in groups for c in g], groups)
    drawn = {negative_caption(caption, random.Random(k), vocab) for k in range(40)}
    assert drawn & set(out) and drawn - set(out)


def test_synth_training_negatives_never_name_a_heldout_combination(tmp_path) -> None:
    from retrieval.data.synth import SynthConfig, generate

    generate(tmp_path, SynthConfig(n=300, seed=3, workers=1), progress=False)
    captions = [line.split('"caption": "')[1].split('"')[0] for line in (tmp_path / "train.jsonl").open()]
    negatives, valid = negative_captions(captions, seed=0, vocabulary=Vocabulary(captions))
    assert sum(valid) >= 0.95 * len(captions)
    assert all(n != c for n, c, v in zip(negatives, captions, valid, strict=True) if v)
    assert not any(f"{c} {s}" in n for n in negatives for c, s in HELDOUT_COMBOS)
    assert negative_captions(captions, 0, Vocabulary(captions)) == (negatives, valid)  # seeded: resumable


def test_clip_loss_negative_text_is_a_negative_only() -> None:
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    scale = torch.tensor(10.0)
    plain = clip_loss(img, txt, scale, gather=False)["itc"]
    # all rows masked: identical to no negatives (t2i untouched, i2t columns at -inf)
    masked = clip_loss(
        img, txt, scale, gather=False, negative_text=txt, negative_valid=torch.zeros(4, dtype=torch.bool)
    )
    assert masked["itc"].item() == pytest.approx(plain.item(), rel=1e-6)
    # a negative identical to the true caption halves each image's best probability: loss rises by ~log 2 / 2
    same = clip_loss(img, txt, scale, gather=False, negative_text=txt)["itc"]
    assert same.item() > plain.item() + 0.3
    # negatives orthogonal to every image barely matter, and ids (multi-positive targets) work with them
    basis = torch.eye(8)
    aligned = clip_loss(basis[:4], basis[:4], scale, gather=False)["itc"]
    ids = torch.tensor([0, 1, 2, 3])
    far = clip_loss(basis[:4], basis[:4], scale, gather=False, negative_text=basis[4:], image_ids=ids)
    assert far["itc"].item() == pytest.approx(aligned.item(), abs=1e-3)
    assert far["sim_i2t"].shape == (4, 4)  # the sims ITM mines from stay in-batch
    feats = img.clone().requires_grad_(True)
    clip_loss(feats, txt, scale, gather=False, negative_text=txt.flip(0))["itc"].backward()
    assert torch.isfinite(feats.grad).all()


def test_distilled_loss_with_negatives() -> None:
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    scale, q = torch.tensor(10.0), FeatureQueue(8, 8)
    plain = distilled_clip_loss(img, txt, img, txt, q, scale, 0.4)["itc"]
    none_valid = torch.zeros(4, dtype=torch.bool)
    masked = distilled_clip_loss(img, txt, img, txt, q, scale, 0.4, None, txt, txt, none_valid)["itc"]
    assert masked.item() == pytest.approx(plain.item(), rel=1e-6)
    harder = distilled_clip_loss(img, txt, img, txt, q, scale, 0.4, None, txt, txt)["itc"]
    assert torch.isfinite(harder) and harder.item() > plain.item()
    with pytest.raises(ValueError, match="m_negative_text"):
        distilled_clip_loss(img, txt, img, txt, q, scale, 0.4, None, txt)


def test_itm_forward_adds_one_negative_pair_per_valid_row() -> None:
    cfg = FusionConfig(width=16, layers=1, heads=2, text_width=8, image_width=8, global_token=False)
    fusion = build_fusion(cfg)
    seen = {}
    original = fusion.itm_logits

    def spy(texts, masks, images, index, image_global=None):
        seen["texts"], seen["images"] = texts, images[index]
        return original(texts, masks, images, index, image_global)

    fusion.itm_logits = spy
    b = 3
    text, image = torch.randn(b, 4, 8), torch.randn(b, 5, 8)
    mask = torch.ones(b, 4, dtype=torch.bool)
    neg = torch.randn(b, 4, 8)
    sim, positives = torch.randn(b, b), torch.eye(b, dtype=torch.bool)
    valid = torch.tensor([True, False, True])
    out = itm_forward(
        fusion,
        text,
        mask,
        image,
        sim,
        sim,
        positives,
        negative_tokens=neg,
        negative_mask=mask,
        negative_valid=valid,
    )
    assert seen["texts"].shape[0] == 3 * b + 2
    assert torch.equal(seen["texts"][3 * b :], neg[valid]) and torch.equal(
        seen["images"][3 * b :], image[valid]
    )
    assert torch.isfinite(out["itm"])


def test_relation_opposite_and_binding_candidates_split_the_rules() -> None:
    caption = "A small red circle to the left of a large blue square"
    assert relation_opposite(caption) == "a small red circle to the right of a large blue square"
    assert relation_opposite("a cat below a dog") == "a cat above a dog"
    assert relation_opposite("a small red circle") is None and relation_opposite("above the clouds") is None
    binding = binding_candidates(caption)
    assert set(binding) == {
        "a small blue circle to the left of a large red square",  # colours swapped
        "a large red circle to the left of a small blue square",  # sizes swapped
        "a small red square to the left of a large blue circle",  # head nouns swapped
    }
    # together they are every rule-made candidate except the phrase swap and the change of axis
    rest = set(candidates(caption)) - set(binding) - {relation_opposite(caption)}
    assert rest == {
        "a large blue square to the left of a small red circle",
        "a small red circle above a large blue square",
        "a small red circle below a large blue square",
    }
    assert binding_candidates("a small red circle") == candidates("a small red circle")


def test_itm_forward_ranks_false_pairs_outside_the_cross_entropy() -> None:
    torch.manual_seed(0)
    fusion = build_fusion(
        FusionConfig(width=16, layers=1, heads=2, text_width=8, image_width=8, global_token=False)
    )
    b = 3
    text, image = torch.randn(b, 4, 8), torch.randn(b + 1, 5, 8)  # one image past the batch
    mask = torch.ones(b, 4, dtype=torch.bool)
    sim, positives = torch.randn(b, b), torch.eye(b, dtype=torch.bool)
    twin = torch.randn(2, 4, 8)
    owner = torch.tensor([0, 2])
    g = torch.Generator().manual_seed(1)
    plain = itm_forward(fusion, text, mask, image[:b], sim, sim, positives, generator=g)
    g = torch.Generator().manual_seed(1)
    ranked = {
        "twin": (twin, mask[:2], owner, owner),
        "image": (text[:1], mask[:1], torch.tensor([b]), owner[:1]),
    }
    out = itm_forward(fusion, text, mask, image, sim, sim, positives, generator=g, ranked=ranked)
    assert out["itm"].item() == pytest.approx(plain["itm"].item(), rel=1e-6)  # ITM's rows are unchanged
    assert {"rank_twin", "rank_twin_acc", "rank_image", "rank_image_acc"} <= out.keys()
    with torch.no_grad():
        lo = fusion.itm_logits(
            torch.cat([text, twin, text[:1]]), mask.new_ones(6, 4), image, torch.tensor([0, 1, 2, 0, 2, 3])
        )
        lo = lo[:, 1] - lo[:, 0]
    expected = F.softplus(-(lo[[0, 2]] - lo[3:5])).mean()
    assert out["rank_twin"].item() == pytest.approx(expected.item(), rel=1e-5)
    expected = F.softplus(-(lo[0] - lo[5]))
    assert out["rank_image"].item() == pytest.approx(expected.item(), rel=1e-5)

    # a scored true pair (text 1 with the image past the batch) compared with a ranked row and a positive
    g = torch.Generator().manual_seed(1)
    inputs = (fusion, text, mask, image, sim, sim, positives)
    out = itm_forward(
        *inputs,
        generator=g,
        ranked=ranked,
        scored={"pair": (text[1:2], mask[:1], torch.tensor([b]))},
        compared={
            "over_image": (("pair", torch.tensor([0])), ("image", torch.tensor([0]))),
            "over_positive": (("pair", torch.tensor([0, 0])), ("positive", torch.tensor([1, 2]))),
        },
    )
    assert out["itm"].item() == pytest.approx(plain["itm"].item(), rel=1e-6)
    assert out["rank_twin"].item() == pytest.approx(
        F.softplus(-(lo[[0, 2]] - lo[3:5])).mean().item(), rel=1e-5
    )
    with torch.no_grad():
        pair = fusion.itm_logits(text[1:2], mask[:1], image[b : b + 1])
        pair = pair[:, 1] - pair[:, 0]
    expected = F.softplus(-(pair[0] - lo[5]))
    assert out["rank_over_image"].item() == pytest.approx(expected.item(), rel=1e-5)
    expected = F.softplus(-(pair[0] - lo[[1, 2]])).mean()
    assert out["rank_over_positive"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_axis_rule_turns_direction_words_a_quarter_in_any_wording() -> None:
    """ "left"/"right" <-> "top"/"bottom" wherever a caption names a direction by them: the objects kept, the
    layout on the other axis; captions the relation lexicon reads change axis by their family instead."""
    from retrieval.train.negatives import axis_swapped

    caption = "left: a large red square; right: a small blue cross"
    turned = "top: a large red square; bottom: a small blue cross"
    assert axis_swapped(caption) == turned and axis_swapped(turned) == caption
    assert turned in candidates(caption)
    assert axis_swapped("a red circle and a blue square") is None
    assert axis_swapped("a leftover sandwich") is None  # whole words only
    synth = "a small red circle to the left of a large blue square"
    assert not any("top" in c or "bottom" in c for c in candidates(synth))
    # and, like every rule, it survives only where the training captions hold its bigrams
    vocabulary = Vocabulary([caption, "top: a small blue square; bottom: a large red cross"])
    assert vocabulary.allows(turned) and not vocabulary.allows("the top side of a small blue cross")

"""Retrieval metrics on hand-made matrices, and the evaluation pipeline end to end on a micro model."""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

import retrieval.models.encoders  # noqa: F401 - registers the "test-micro" preset with open_clip
from retrieval.data.images import load_for_model
from retrieval.data.pairs import Pair, iter_pairs
from retrieval.data.synth import (
    REVERSED,
    SynthConfig,
    caption_for,
    generate,
    hard_negatives,
    parse_caption,
    scene_key,
)
from retrieval.errors import UserError
from retrieval.eval import scoring as scoring_module
from retrieval.eval.evaluate import EvalConfig, evaluate
from retrieval.eval.metrics import binding_accuracy, recall_at_k, rerank_score, rerank_top_k
from retrieval.models.albef import AlbefModel, itm_match_prob
from retrieval.models.fusion import FusionConfig

# --- recall_at_k --------------------------------------------------------------------------------------------


def test_recall_single_positive_by_hand() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.9], [0.5, 0.6, 0.1]])  # (Q=3, G=3)
    positive = torch.eye(3, dtype=torch.bool)
    # query 0: its image ranks 1st; query 1: 2nd; query 2: 3rd
    assert recall_at_k(sim, positive, ks=(1, 2, 3)) == {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0}


def test_recall_counts_any_positive_of_a_shared_caption() -> None:
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.1, 0.5, 0.9, 0.3]])  # (Q=2, G=4)
    positive = torch.tensor([[False, True, False, True], [True, False, True, False]])
    # query 0's best positive (image 1) is 2nd; query 1's 2nd positive (image 2) is 1st, image 0 is last
    assert recall_at_k(sim, positive, ks=(1, 2)) == {"R@1": 0.5, "R@2": 1.0}


def test_recall_clips_k_to_gallery_and_skips_queries_without_positive() -> None:
    sim = torch.tensor([[0.1, 0.9], [0.3, 0.2], [0.5, 0.5]])  # (Q=3, G=2)
    positive = torch.tensor([[True, False], [True, False], [False, False]])  # query 2 has no positive
    assert recall_at_k(sim, positive, ks=(1, 10)) == {"R@1": 0.5, "R@10": 1.0}
    with pytest.raises(ValueError, match="none of the 1 queries"):
        recall_at_k(sim[2:], positive[2:])
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.full((2, 2), float("nan")), torch.eye(2, dtype=torch.bool))


def test_recall_ties_count_against_the_query() -> None:
    # A collapsed model (all scores equal) must not get a free R@1 from the gallery order.
    assert recall_at_k(torch.zeros(3, 3), torch.eye(3, dtype=torch.bool), ks=(1, 3)) == {
        "R@1": 0.0,
        "R@3": 1.0,
    }


# --- rerank_top_k -------------------------------------------------------------------------------------------


def test_rerank_score_adds_the_contrastive_logit_and_the_itm_log_odds() -> None:
    cosine = torch.tensor([0.5, 0.5, 0.2, 0.9])
    prob = torch.tensor([0.5, 0.9, 0.9, 0.0])
    got = rerank_score(cosine, prob, logit_scale=20.0, itm_weight=1.0)
    assert torch.allclose(got[:3], torch.tensor([10.0, 10.0 + math.log(9), 4.0 + math.log(9)]))
    assert torch.isfinite(got[3]) and got[3] < 18.0 - 13.0  # a saturated "no" is a large finite penalty
    # the default weighs ITM's log-odds by a quarter
    default = rerank_score(cosine, prob, logit_scale=20.0)
    assert torch.allclose(
        default[:3], torch.tensor([10.0, 10.0 + 0.25 * math.log(9), 4.0 + 0.25 * math.log(9)])
    )
    # ITM can overturn the contrastive order, and the contrastive logit can overturn ITM
    assert got[1] > got[0] and got[1] > got[2]
    with pytest.raises(ValueError, match="one shape"):
        rerank_score(cosine, prob[:2], 20.0)


def test_rerank_reorders_only_the_top_k_which_stay_first() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.3, 0.6], [0.0, 0.5, 0.4, 0.9, 0.2, 0.1]])  # (Q=2, G=6)
    calls = []

    def score(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        calls.append((q.tolist(), c.tolist()))
        return -sim[q, c] * 1000  # the reverse of sim, and far below every sim: must still rank first

    out = rerank_top_k(sim, 3, score)
    assert calls == [([0, 0, 0, 1, 1, 1], [0, 2, 3, 3, 1, 2])]  # one call, query-major, top k in sim order
    order = out.argsort(dim=1, descending=True)
    assert order.tolist() == [[3, 2, 0, 5, 4, 1], [2, 1, 3, 4, 5, 0]]
    rest = torch.tensor([[1, 4, 5], [0, 4, 5]])
    assert torch.equal(out.gather(1, rest), sim.gather(1, rest))  # untouched outside the top k


def test_rerank_ties_keep_the_original_order_and_k_is_clipped() -> None:
    sim = torch.tensor([[0.2, 0.9, 0.5]])
    out = rerank_top_k(sim, 10, lambda q, c: torch.ones(len(q)))  # k > G; every new score equal
    assert out.argsort(dim=1, descending=True).tolist() == [[1, 2, 0]]
    assert out.unique().numel() == 3  # ties broken in the matrix itself, so recall_at_k cannot reorder them
    with pytest.raises(ValueError, match=r"\(3,\)"):
        rerank_top_k(sim, 3, lambda q, c: torch.ones(2))


# --- binding_accuracy ---------------------------------------------------------------------------------------


def test_binding_accuracy_ignores_nan_padding_and_needs_strictly_higher() -> None:
    true = torch.tensor([0.5, 0.2, 0.9])
    nan = float("nan")
    negatives = torch.tensor([[0.4, 0.6, 0.5], [0.1, nan, nan], [nan, nan, nan]])  # (N=3, M=3)
    # row 0: beats 0.4, loses to 0.6, ties 0.5 (not a win); row 1: beats 0.1; row 2: nothing to compare
    assert binding_accuracy(true, negatives) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="undefined"):
        binding_accuracy(true, torch.full((3, 2), nan))


# --- evaluate end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> list[Pair]:
    out = tmp_path_factory.mktemp("synth")
    generate(out, SynthConfig(n=40), progress=False)
    return list(iter_pairs(out / "heldout.jsonl"))


def micro_model() -> AlbefModel:
    torch.manual_seed(0)
    return AlbefModel(open_clip.create_model("test-micro"), FusionConfig(width=32, layers=1, heads=2))


def run(model: AlbefModel, pairs: list[Pair], cfg: EvalConfig, **overrides) -> dict[str, float | int]:
    kwargs = dict(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device=torch.device("cpu"))
    kwargs["tokenizer"] = open_clip.get_tokenizer("test-micro")
    return evaluate(model, pairs, cfg, **{**kwargs, **overrides})


RECALLS = [f"{d}.R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]


def test_evaluate_reports_every_metric_in_range(heldout: list[Pair], tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    pairs = [*heldout, Pair(str(broken), str(broken), "a small red circle")]
    model = micro_model().train()
    result = run(model, pairs, EvalConfig(rerank_k=4))
    assert model.training  # the caller's mode is restored
    expected = {*RECALLS, *(f"rerank.{m}" for m in RECALLS), "binding", "binding.itc", "binding.rerank"}
    assert expected <= result.keys()
    assert all(0.0 <= result[k] <= 1.0 for k in expected)
    assert result["n_images"] == len(heldout) and result["skipped_images"] == 1
    assert 1 <= result["n_texts"] <= len(heldout)

    with pytest.raises(UserError, match="none of the 1 images could be decoded"):
        run(model, pairs[-1:], EvalConfig())
    small = run(model, pairs, EvalConfig(limit=3, binding=False))
    assert small["n_images"] == 3 and not any(k.startswith(("rerank", "binding")) for k in small)


def _reworded(pair: Pair, image: str) -> Pair:
    """The same scene in the other wording ('B right of A' for 'A left of B'), for `image`."""
    objects, relation = pair.extra["objects"], pair.extra["relation"]
    return Pair(image, image, caption_for(objects[::-1], REVERSED[relation]), dict(pair.extra))


def test_evaluate_oracle_scores_are_perfect(
    heldout: list[Pair], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Features that identify the scene exactly must give R@1 = 1 both ways and binding = 1: this checks the
    gallery, the queries (every distinct caption), the positives by scene and the re-ranking wiring, not a model."""
    two = next(p for p in heldout if p.extra["relation"] is not None)
    copy = tmp_path / "copy.jpg"
    shutil.copy(two.image, copy)
    # a second caption of one image in the other wording (a query of its own, COCO protocol), and a second image of
    # the same scene under that wording (both images are positives of both queries; ties must not hurt)
    pairs = [*heldout, _reworded(two, two.image), _reworded(two, str(copy))]

    scene_ids: dict[str, int] = {}

    def scene_id(caption: str) -> int:
        return scene_ids.setdefault(scene_key(*parse_caption(caption)), len(scene_ids) + 1)

    image_scene = {p.image: scene_id(caption_for(p.extra["objects"], p.extra["relation"])) for p in pairs}
    dim, pooled_shift = 256, [0]

    def fake_load(source: str, size: int):  # the pixels carry the scene id
        return np.full((size, size, 3), image_scene[str(source)], dtype=np.uint8), size, size

    def fake_image(clip, x):  # x = pixel value exactly, with mean 0 and std 1/255
        ids = x[:, 0, 0, 0].round().long()  # (B,)
        pooled = torch.nn.functional.one_hot(ids + pooled_shift[0], dim).float()  # (B, dim), ITC reads this
        return pooled, torch.nn.functional.one_hot(ids, dim).float().unsqueeze(1)  # ITM reads (B, 1, dim)

    def fake_tokenizer(captions: list[str]) -> torch.Tensor:
        return torch.tensor([[1, scene_id(c)] for c in captions])  # (B, 2): a BOS, then the scene

    def fake_text(clip, ids):
        feat = torch.nn.functional.one_hot(ids[:, 1], dim).float()  # (B, dim)
        return feat, feat.unsqueeze(1).expand(-1, 2, -1)  # (B, dim), (B, 2, dim)

    def fake_itm(model, text_tokens, text_mask, image_tokens, image_index, image_global):
        images = image_tokens[image_index]  # (B, N, W): the image each text row is scored against
        return (text_tokens[:, 0] * images[:, 0]).sum(-1)  # (B,) 1 for the same scene, else 0

    monkeypatch.setattr(scoring_module, "load_for_model", fake_load)
    monkeypatch.setattr(scoring_module, "encode_image_tokens", fake_image)
    monkeypatch.setattr(scoring_module, "encode_text_tokens", fake_text)
    monkeypatch.setattr(scoring_module, "itm_match_prob", fake_itm)
    oracle = dict(mean=(0, 0, 0), std=(1 / 255,) * 3, tokenizer=fake_tokenizer)
    result = run(micro_model(), pairs, EvalConfig(rerank_k=3), **oracle)
    assert result["n_images"] == len(heldout) + 1
    assert result["n_texts"] == len({p.caption.lower() for p in pairs})
    for metric in RECALLS:
        assert result[metric] == 1.0, metric
        assert result[f"rerank.{metric}"] == 1.0, metric
    assert result["binding"] == 1.0 and result["binding.itc"] == 1.0

    # ITC now points every image at the wrong scene while ITM stays exact: plain recall fails, and re-ranking
    # everything (k >= gallery) by ITM alone must restore it, in both directions.
    pooled_shift[0] = 1
    wrong = run(micro_model(), pairs, EvalConfig(rerank_k=100), **oracle)
    assert wrong["t2i.R@1"] < 1.0 and wrong["i2t.R@1"] < 1.0 and wrong["binding.itc"] < 1.0
    assert (
        wrong["rerank_itm.t2i.R@1"] == 1.0 and wrong["rerank_itm.i2t.R@1"] == 1.0 and wrong["binding"] == 1.0
    )
    # the fused score follows ITM wherever ITM's weighted log-odds outweigh the contrastive logit's error
    assert wrong["rerank.t2i.R@1"] > wrong["t2i.R@1"] or wrong["t2i.R@1"] == 1.0


def test_binding_matches_a_direct_computation(heldout: list[Pair]) -> None:
    """Each image's truth and negatives scored one image at a time: full-length tokens, no batch, no cache."""
    model = micro_model().eval()
    cfg = EvalConfig(seed=3)
    result = run(model, heldout, cfg)
    tokenizer = open_clip.get_tokenizer("test-micro")
    rng = random.Random(cfg.seed)  # evaluate draws the negatives image by image in gallery order, as here
    itm, itc, kinds = [], [], []
    with torch.inference_mode():
        for p in heldout:
            truth = caption_for(p.extra["objects"], p.extra["relation"])
            found = hard_negatives(p.extra, rng)
            captions = [truth, *(caption for _, caption in found)]
            kinds.append(["truth", *(kind for kind, _ in found)])
            pixels = torch.from_numpy(load_for_model(p.image, 32)[0]).permute(2, 0, 1)  # (3, S, S)
            x = ((pixels.float() / 255 - 0.5) / 0.25).expand(len(captions), -1, -1, -1)  # (C, 3, S, S)
            enc = model.encode(x, tokenizer(captions))
            itm.append(
                itm_match_prob(model, enc.text_tokens, enc.text_mask, enc.image_tokens, None, enc.image_feat)
            )  # (C,)
            itc.append((enc.image_feat * enc.text_feat).sum(-1))  # (C,)

    def split(rows: list[torch.Tensor], kind: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # with a kind, the other kinds' negatives are left out (NaN)
        other = [torch.tensor([kind is not None and k not in (kind, "truth") for k in ks]) for ks in kinds]
        rows = [r.masked_fill(o, float("nan")) for r, o in zip(rows, other, strict=True)]
        m = max(len(r) for r in rows) - 1
        negatives = [torch.nn.functional.pad(r[1:], (0, m - len(r) + 1), value=float("nan")) for r in rows]
        return torch.stack([r[0] for r in rows]), torch.stack(negatives)  # (N,), (N, M)

    assert result["binding"] == pytest.approx(binding_accuracy(*split(itm)), abs=1e-9)
    assert result["binding.itc"] == pytest.approx(binding_accuracy(*split(itc)), abs=1e-9)
    scale = float(model.logit_scale.detach().exp())
    fused = [rerank_score(c, m, scale) for c, m in zip(itc, itm, strict=True)]  # what re-ranking sorts by
    assert result["binding.rerank"] == pytest.approx(binding_accuracy(*split(fused)), abs=1e-9)
    assert {k for ks in kinds for k in ks[1:]} == {"color", "shape", "size", "relation"}
    for kind in ("color", "shape", "size", "relation"):  # each kind of false caption on its own
        assert result[f"binding.{kind}"] == pytest.approx(binding_accuracy(*split(itm, kind)), abs=1e-9)
        assert result[f"binding.itc.{kind}"] == pytest.approx(binding_accuracy(*split(itc, kind)), abs=1e-9)


def test_itm_scorer_trims_padding_and_caches_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    model = micro_model().eval()
    tokenizer = open_clip.get_tokenizer("test-micro")
    with torch.inference_mode():
        # different lengths, so trimming to the longest real caption in a batch is really exercised
        captions = ["a small red circle", "a large blue square to the left of a small green cross", "a cross"]
        texts = scoring_module.encode_texts(model.clip, tokenizer, captions, torch.device("cpu"), 8, True)
        image_tokens = torch.randn(2, 5, model.clip.visual.transformer.width)  # (I=2, N, Wv)
        pooled = torch.nn.functional.normalize(torch.randn(2, model.embed_dim), dim=-1)  # (I, D)
        images = scoring_module.Encoded(pooled, image_tokens)
        scorer = scoring_module.PairScorer(model, texts, images, batch=2)
        t, i = torch.tensor([0, 1, 2, 2]), torch.tensor([1, 0, 1, 0])
        got = scorer(t, i)
        full = model.itm_logits(texts.tokens[t], texts.mask[t], image_tokens[i], None, pooled[i])  # (4, 2)
        full = full.softmax(-1)[:, 1]  # (4,)
        assert torch.allclose(got, full, atol=1e-5)
        calls: list[int] = []
        monkeypatch.setattr(scoring_module, "itm_match_prob", lambda m, tok, *_: calls.append(len(tok)))
        again = scorer(t.flip(0), i.flip(0))  # pairs already scored: no fusion pass
        assert calls == [] and torch.equal(again, got.flip(0))


def test_eval_config_rejects_nonsense() -> None:
    for bad in ({"rerank_k": -1}, {"limit": 0}, {"batch_size": 0}):
        with pytest.raises(UserError):
            EvalConfig(**bad)

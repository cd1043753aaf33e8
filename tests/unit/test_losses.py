"""Contrastive, mining, matching and distillation losses: values, gradients, sampling statistics, edge cases."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from retrieval.losses.contrastive import (
    clamp_logit_scale,
    clip_loss,
    gather_features,
    gather_ids,
    local_block,
)
from retrieval.losses.distill import FeatureQueue, distilled_clip_loss, match_belief, momentum_update
from retrieval.losses.matching import itm_loss, pairwise_rank_loss
from retrieval.losses.mining import same_id_mask, sample_negatives


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core box they run 10-40x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- contrastive


def _ref_infonce(img: list[list[float]], txt: list[list[float]], scale: float) -> float:
    """Symmetric InfoNCE in plain Python, independent of torch."""

    def unit(v: list[float]) -> list[float]:
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    img, txt = [unit(v) for v in img], [unit(v) for v in txt]
    logits = [[scale * sum(a * b for a, b in zip(i, t, strict=True)) for t in txt] for i in img]
    n = len(img)

    def ce(rows: list[list[float]]) -> float:
        return sum(math.log(sum(math.exp(x) for x in r)) - r[k] for k, r in enumerate(rows)) / n

    cols = [[logits[i][j] for i in range(n)] for j in range(n)]
    return (ce(logits) + ce(cols)) / 2


def test_clip_loss_matches_hand_computed_3x3() -> None:
    img = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    txt = [[3.0, 0.0], [1.0, 1.0], [-1.0, 2.0]]
    out = clip_loss(torch.tensor(img), torch.tensor(txt), torch.tensor(2.0))
    assert out["itc"].item() == pytest.approx(_ref_infonce(img, txt, 2.0), rel=1e-5)
    # i2t and t2i cross-entropies differ here (1.144 vs 1.114), so a one-sided loss cannot pass.
    # Sims are the detached scaled logits: image 0 . text 0 = 2 * 1.
    assert out["sim_i2t"].shape == (3, 3) and not out["sim_i2t"].requires_grad
    assert out["sim_i2t"][0, 0].item() == pytest.approx(2.0)
    assert torch.allclose(out["sim_t2i"], out["sim_i2t"].T)


def test_clip_loss_decreases_as_features_align() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.randn(8, 16, generator=g)
    noise = torch.randn(8, 16, generator=g)
    scale = torch.tensor(10.0)
    losses = [clip_loss(img, img + s * noise, scale)["itc"].item() for s in (3.0, 1.0, 0.3, 0.0)]
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False)), losses


def test_clip_loss_trains_features_and_temperature() -> None:
    torch.manual_seed(0)
    img = nn.Parameter(torch.randn(6, 8))
    txt = nn.Parameter(torch.randn(6, 8))
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    first = clip_loss(img, txt, log_scale.exp())["itc"].item()
    for _ in range(50):
        loss = clip_loss(img, txt, log_scale.exp())["itc"]
        img.grad = txt.grad = log_scale.grad = None
        loss.backward()
        with torch.no_grad():  # plain SGD; torch.optim's first step costs seconds of lazy imports
            for p in (img, txt, log_scale):
                p -= 0.5 * p.grad
        clamp_logit_scale(log_scale)
    assert loss.item() < first * 0.2
    assert 0.0 <= log_scale.item() <= math.log(100.0) + 1e-6


def test_clamp_logit_scale_bounds() -> None:
    p = nn.Parameter(torch.tensor(9.0))
    clamp_logit_scale(p, max_scale=50.0)
    assert p.item() == pytest.approx(math.log(50.0))
    p = nn.Parameter(torch.tensor(-3.0))
    clamp_logit_scale(p)
    assert p.item() == 0.0
    p = nn.Parameter(torch.tensor(2.0))
    clamp_logit_scale(p)
    assert p.item() == 2.0


def test_gather_is_identity_without_distributed() -> None:
    assert not dist.is_initialized()
    a, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    ga, gb = gather_features(a, b)
    assert ga is a and gb is b
    ids = torch.arange(4)
    assert gather_ids(ids) is ids
    sim = torch.randn(4, 4)
    assert local_block(sim) is not None and torch.equal(local_block(sim), sim)
    with pytest.raises(ValueError, match="world"):
        local_block(torch.randn(4, 8))


def test_shared_ids_give_multi_positive_targets() -> None:
    # Rows 0 and 1 share an id (a repeated synthetic caption): image 0 sits closer to text 1 than to its own
    # text 0. Treated as negatives that is a large penalty; with shared ids both columns are positives.
    g = torch.Generator().manual_seed(1)
    a, c = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    b = F.normalize(a + 0.3 * torch.randn(8, generator=g), dim=-1)
    img = torch.stack([a, b, c])
    txt = torch.stack([b, a, c])
    scale = torch.tensor(20.0)
    as_negatives = clip_loss(img, txt, scale)["itc"]
    shared = clip_loss(img, txt, scale, image_ids=torch.tensor([7, 7, 3]))["itc"]
    assert shared.item() < as_negatives.item() - 0.3
    # Rows 0 and 1 put 1/2 on columns 0 and 1 each; row 2 keeps its single positive.
    logits = scale * img @ txt.T
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected = -(targets * logits.log_softmax(1)).sum(1).mean()  # i2t; t2i is the same by symmetry here
    expected_t2i = -(targets * logits.T.log_softmax(1)).sum(1).mean()
    assert shared.item() == pytest.approx(((expected + expected_t2i) / 2).item(), rel=1e-5)


# -------------------------------------------------------- 2-process gather


def _gather_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(123)
        all_img = torch.randn(world * 3, 5, generator=g)  # the same global batch on every rank
        all_txt = torch.randn(world * 3, 5, generator=g)
        img = all_img[rank * 3 : (rank + 1) * 3].clone().requires_grad_(True)
        txt = all_txt[rank * 3 : (rank + 1) * 3].clone().requires_grad_(True)

        gi, gt = gather_features(img, txt)
        weights = torch.arange(gi.numel(), dtype=torch.float32).reshape(gi.shape)
        (gi * weights).sum().backward()
        results[f"gather_{rank}"] = (
            torch.equal(gi.detach(), all_img) and torch.equal(gt.detach(), all_txt),
            torch.equal(img.grad, weights[rank * 3 : (rank + 1) * 3]),
        )

        img.grad = None
        txt.grad = None
        ids = torch.tensor([0, 1, 2]) + 10 * rank
        out = clip_loss(img, txt, torch.tensor(5.0), image_ids=ids)
        out["itc"].backward()
        unit_img, unit_txt = F.normalize(all_img, dim=-1), F.normalize(all_txt, dim=-1)
        local = slice(rank * 3, (rank + 1) * 3)
        results[f"clip_{rank}"] = (
            out["itc"].item(),
            img.grad.clone(),
            txt.grad.clone(),
            tuple(out["sim_i2t"].shape),
            torch.allclose(out["sim_i2t"], 5.0 * unit_img[local] @ unit_txt.T, atol=1e-5)
            and torch.allclose(out["sim_t2i"], 5.0 * unit_txt[local] @ unit_img.T, atol=1e-5)
            and torch.equal(local_block(out["sim_i2t"]), out["sim_i2t"][:, local]),
            torch.equal(gather_ids(ids), torch.tensor([0, 1, 2, 10, 11, 12])),
        )
    finally:
        dist.destroy_process_group()


def test_gather_features_two_process_gloo() -> None:
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_gather_worker, args=(world, os.path.join(tmp, "init"), results), nprocs=world, join=True)
        results = dict(results)
    for rank in range(world):
        values_ok, grad_ok = results[f"gather_{rank}"]
        assert values_ok, "gathered features differ from the concatenated per-rank features"
        assert grad_ok, "the local slice of the gathered tensor lost its gradient"

    # Every rank computes the full global loss, and each local slice gets the exact global gradient.
    g = torch.Generator().manual_seed(123)
    all_img = torch.randn(world * 3, 5, generator=g).requires_grad_(True)
    all_txt = torch.randn(world * 3, 5, generator=g).requires_grad_(True)
    ref = clip_loss(all_img, all_txt, torch.tensor(5.0), gather=False)
    ref["itc"].backward()
    for rank in range(world):
        loss, img_grad, txt_grad, sim_shape, sims_ok, ids_ok = results[f"clip_{rank}"]
        assert loss == pytest.approx(ref["itc"].item(), rel=1e-5)
        assert torch.allclose(img_grad, all_img.grad[rank * 3 : (rank + 1) * 3], atol=1e-6)
        assert torch.allclose(txt_grad, all_txt.grad[rank * 3 : (rank + 1) * 3], atol=1e-6)
        assert sim_shape == (3, 6)
        assert sims_ok, "sims must be this rank's rows against the global batch"
        assert ids_ok


# ---------------------------------------------------------------- mining


def test_sample_negatives_never_returns_a_positive() -> None:
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(64, 12, generator=g) * 5
    mask = torch.rand(64, 12, generator=g) < 0.7
    mask[:, 0] = False  # every row keeps at least one negative
    mask |= torch.eye(64, 12, dtype=torch.bool)
    for hard in (True, False):
        for _ in range(200):
            idx = sample_negatives(sim, mask, hard=hard, generator=g)
            assert idx.shape == (64,) and idx.dtype == torch.long
            assert not mask[torch.arange(64), idx].any()


def test_hard_sampling_tracks_softmax_over_negatives() -> None:
    row = torch.tensor([6.0, 2.0, 1.0, 0.0, -1.0])
    n = 40_000
    sim = row.expand(n, 5)
    mask = torch.tensor([True, False, False, False, False]).expand(n, 5)
    idx = sample_negatives(sim, mask, hard=True, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=5).float() / n
    expected = torch.cat([torch.zeros(1), row[1:].softmax(0)])
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)
    assert freq.argmax().item() == 1  # the most similar negative, never the (more similar) positive


def test_uniform_sampling_is_uniform_over_negatives() -> None:
    n = 40_000
    sim = torch.tensor([6.0, 50.0, 1.0, 0.0, -9.0]).expand(n, 5)
    mask = torch.tensor([True, False, False, False, False]).expand(n, 5)
    idx = sample_negatives(sim, mask, hard=False, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=5).float() / n
    assert freq[0] == 0
    assert torch.allclose(freq[1:], torch.full((4,), 0.25), atol=0.01), freq


def test_easy_share_mixes_softmax_and_uniform_over_negatives() -> None:
    row = torch.tensor([6.0, 2.0, 1.0, 0.0, -1.0])
    n = 40_000
    sim = row.expand(n, 5)
    mask = torch.tensor([True, False, False, False, False]).expand(n, 5)
    idx = sample_negatives(sim, mask, hard=True, uniform=0.5, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=5).float() / n
    expected = torch.cat([torch.zeros(1), 0.5 * row[1:].softmax(0) + 0.5 * torch.full((4,), 0.25)])
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)
    with pytest.raises(ValueError, match="uniform"):
        sample_negatives(sim, mask, uniform=1.5)


def test_all_positive_row_gets_no_negative() -> None:
    """A row whose every candidate is a positive (images sharing captions, as in bootstrapped data) gets -1,
    never a crash and never a positive; the other rows are sampled as usual."""
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1] = True
    for hard in (True, False):
        idx = sample_negatives(torch.randn(3, 4), mask, hard=hard, generator=torch.Generator().manual_seed(0))
        assert idx[1] == -1 and (idx[[0, 2]] >= 0).all()
    assert (sample_negatives(torch.randn(2, 2), torch.ones(2, 2, dtype=torch.bool)) == -1).all()


def test_sampling_survives_infinite_and_huge_sims() -> None:
    inf = float("inf")
    sim = torch.tensor(
        [
            [1e30, -inf, 3.0, -1e30],  # huge values: no overflow, the huge one wins
            [0.0, -inf, -inf, 5.0],  # -inf negatives are never picked while finite ones exist
            [9.0, -inf, -inf, -inf],  # every negative at -inf: uniform over them, not NaN
            [inf, 1.0, inf, 2.0],  # +inf negative dominates
        ]
    ).half()  # low precision input is computed in float32
    mask = torch.tensor(
        [
            [False, False, False, False],
            [False, False, False, True],
            [True, False, False, False],
            [True, False, False, False],
        ]
    )
    g = torch.Generator().manual_seed(0)
    picks = torch.stack([sample_negatives(sim, mask, generator=g) for _ in range(300)])  # (300, 4)
    assert (picks[:, 0] == 0).all()  # fp16 turns 1e30 into inf: still the favourite, no NaN
    assert (picks[:, 1] == 0).all()
    assert set(picks[:, 2].tolist()) == {1, 2, 3}
    assert (picks[:, 3] == 2).all()
    # Extreme finite float32 values overflow (s - max) to -inf: still no NaN, the largest wins.
    extreme = torch.tensor([[3e38, -3e38, 1.0]])
    assert sample_negatives(extreme, torch.zeros(1, 3, dtype=torch.bool), generator=g).item() == 0
    with pytest.raises(ValueError, match="NaN"):
        sample_negatives(torch.tensor([[float("nan"), 1.0]]), torch.zeros(1, 2, dtype=torch.bool))


def test_same_id_mask() -> None:
    mask = same_id_mask(torch.tensor([1, 2, 1]), torch.tensor([1, 3, 2, -1]))
    assert mask.tolist() == [
        [True, False, False, False],
        [False, False, True, False],
        [True, False, False, False],
    ]


# ---------------------------------------------------------------- matching


def test_itm_loss_labels_and_accuracy() -> None:
    pos = torch.tensor([[0.0, 3.0], [2.0, 0.0]])  # first right, second wrong
    neg = torch.tensor([[4.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # right, wrong, right
    out = itm_loss(pos, neg)
    labels = torch.tensor([1, 1, 0, 0, 0])
    assert out["itm"].item() == pytest.approx(F.cross_entropy(torch.cat([pos, neg]), labels).item())
    assert out["itm_acc"].item() == pytest.approx(3 / 5)
    perfect = itm_loss(pos[:1], neg[[0, 2]])
    assert perfect["itm_acc"].item() == 1.0 and perfect["itm"].item() < out["itm"].item()
    with pytest.raises(ValueError):
        itm_loss(torch.zeros(2, 3), neg)


def test_pairwise_rank_loss_is_softplus_of_the_negative_margin() -> None:
    true = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    false = torch.tensor([0.0, 1.0, -1.0])
    out = pairwise_rank_loss(true, false)
    expected = (F.softplus(torch.tensor(-2.0)) + F.softplus(torch.tensor(1.0)) + math.log(2)) / 3
    assert out["rank"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["rank_acc"].item() == pytest.approx(1 / 3)  # a tie is not ordered right
    out["rank"].backward()
    assert bool((true.grad < 0).all())  # every true score is pushed up, the worst-ordered hardest
    assert true.grad[1] < true.grad[0]
    # only the order counts: shifting both scores of a pair changes nothing
    shifted = pairwise_rank_loss(true.detach() + 5.0, false + 5.0)
    assert shifted["rank"].item() == pytest.approx(out["rank"].item(), rel=1e-6)
    empty = pairwise_rank_loss(torch.zeros(0), torch.zeros(0))
    assert empty["rank"].item() == 0.0 and empty["rank_acc"].item() == 0.0
    with pytest.raises(ValueError, match=r"\(N,\)"):
        pairwise_rank_loss(torch.zeros(3), torch.zeros(2))


# ---------------------------------------------------------------- distillation


def test_momentum_update_math_and_buffers() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    mom = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in mom.state_dict().items()}
    momentum_update(model, mom, 0.9)
    for name, p in model.named_parameters():
        expected = 0.9 * before[name] + 0.1 * p.detach()
        assert torch.allclose(mom.get_parameter(name), expected), name
    assert torch.equal(mom[1].running_mean, model[1].running_mean)
    with pytest.raises(ValueError):
        momentum_update(model, nn.Linear(3, 4), 0.9)


def test_feature_queue_wraps_and_checkpoints() -> None:
    q = FeatureQueue(dim=2, size=5)
    assert [t.shape[0] for t in q.features()] == [0, 0, 0]
    rows = torch.arange(16, dtype=torch.float32).reshape(8, 2)
    q.enqueue(rows[:3], -rows[:3], torch.tensor([0, 1, 2]))
    img, txt, idx = q.features()
    assert torch.equal(img, rows[:3]) and torch.equal(txt, -rows[:3]) and idx.tolist() == [0, 1, 2]
    q.enqueue(rows[3:6], -rows[3:6])  # 3 rows into 2 free slots: the last wraps to slot 0
    img, _, idx = q.features()
    assert torch.equal(img, rows[[5, 1, 2, 3, 4]])
    assert idx.tolist() == [-1, 1, 2, -1, -1]
    assert int(q.ptr) == 1
    q.enqueue(rows[:7], rows[:7], torch.arange(7))  # larger than the queue: the newest 5 survive
    img, _, idx = q.features()
    assert sorted(idx.tolist()) == [2, 3, 4, 5, 6]
    assert torch.equal(img[idx.argsort()], rows[2:7])
    q2 = FeatureQueue(dim=2, size=5)
    q2.load_state_dict(q.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(q.features(), q2.features(), strict=True))
    assert int(q2.ptr) == int(q.ptr)


def test_distilled_loss_alpha0_empty_queue_equals_plain_loss() -> None:
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    scale = torch.tensor(7.0)
    q = FeatureQueue(8, 16)
    plain = clip_loss(img, txt, scale, gather=False)
    out = distilled_clip_loss(img, txt, img, txt, q, scale, alpha=0.0)
    assert out["itc"].item() == pytest.approx(plain["itc"].item(), rel=1e-5)
    assert torch.allclose(out["sim_i2t"], plain["sim_i2t"]) and torch.allclose(
        out["sim_t2i"], plain["sim_t2i"]
    )
    ids = torch.tensor([0, 0, 1, 2, 3])
    plain_ids = clip_loss(img, txt, scale, gather=False, image_ids=ids)["itc"]
    assert distilled_clip_loss(img, txt, img, txt, q, scale, 0.0, ids)["itc"].item() == pytest.approx(
        plain_ids.item(), rel=1e-5
    )


def test_distilled_loss_uses_queue_ids_and_momentum_targets() -> None:
    g = torch.Generator().manual_seed(0)
    b, d, alpha, scale = 3, 4, 0.4, torch.tensor(5.0)
    img, txt = torch.randn(b, d, generator=g, requires_grad=True), torch.randn(b, d, generator=g)
    m_img, m_txt = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    q = FeatureQueue(d, 8)
    q_img, q_txt = torch.randn(2, d, generator=g), torch.randn(2, d, generator=g)
    q.enqueue(q_img, q_txt, torch.tensor([1, 9]))  # queue entry 0 shares id 1 with batch row 1
    ids = torch.tensor([0, 1, 2])
    out = distilled_clip_loss(img, txt, m_img, m_txt, q, scale, alpha, ids)

    n = F.normalize
    img_all, txt_all = n(torch.cat([m_img, q_img])), n(torch.cat([m_txt, q_txt]))
    hard = torch.tensor([[1, 0, 0, 0, 0], [0, 0.5, 0, 0.5, 0], [0, 0, 1, 0, 0]])
    t_i2t = alpha * (scale * n(m_img) @ txt_all.T).softmax(1) + (1 - alpha) * hard
    t_t2i = alpha * (scale * n(m_txt) @ img_all.T).softmax(1) + (1 - alpha) * hard
    l_i2t = -(t_i2t * (scale * n(img) @ txt_all.T).log_softmax(1)).sum(1).mean()
    l_t2i = -(t_t2i * (scale * n(txt) @ img_all.T).log_softmax(1)).sum(1).mean()
    assert out["itc"].item() == pytest.approx(((l_i2t + l_t2i) / 2).item(), rel=1e-5)
    assert out["sim_i2t"].shape == (b, b)
    out["itc"].backward()
    assert img.grad is not None and torch.isfinite(img.grad).all()
    with pytest.raises(ValueError, match="non-negative"):
        distilled_clip_loss(img, txt, m_img, m_txt, q, scale, alpha, torch.tensor([-1, 0, 1]))


def test_match_belief_separates_true_pairs_from_captions_of_other_images() -> None:
    g = torch.Generator().manual_seed(0)
    u, d = 200, 256
    text = F.normalize(torch.randn(u, d, generator=g), dim=-1)  # (U, D)
    caption = torch.arange(u).repeat(2)  # (N=400,): every caption has two images
    jitter = F.normalize(torch.randn(2 * u, d, generator=g), dim=-1)  # (N, D)
    image = F.normalize(text[caption] + 0.5 * jitter, dim=-1)  # (N, D), cosine ~0.9 with its caption
    noisy = torch.zeros(2 * u, dtype=torch.bool)
    noisy[::5] = True  # a fifth of the pairs carry another image's caption
    written = torch.where(noisy, (caption + 7) % u, caption)
    belief = match_belief(image, text, written, scale=20.0, negatives=15, generator=g)
    assert belief.shape == (2 * u,) and bool(((belief > 0) & (belief <= 1)).all())
    assert belief[~noisy].min() > belief[noisy].max()  # every true pair above every false one
    assert belief[~noisy].mean() > 0.9 and belief[noisy].mean() < 0.1
    # the other image of a pair's own caption is never a negative: pairs of two identical images stay sure
    twins = match_belief(text[caption], text, caption, scale=20.0, negatives=15, generator=g)
    assert twins.min() > 0.9
    # seeded: the same generator state, the same beliefs
    a = match_belief(image, text, written, 20.0, 15, torch.Generator().manual_seed(3))
    assert torch.equal(a, match_belief(image, text, written, 20.0, 15, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="negatives >= 1"):
        match_belief(image, text, written, 20.0, 0)

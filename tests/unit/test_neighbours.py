import torch

from retrieval.train.data import BatchPlan
from retrieval.train.neighbours import caption_ids, caption_neighbours

CAPTIONS = [
    "a small red circle above a large blue square",
    "a small red circle below a large blue square",  # one word apart from 0
    "A small red circle above  a large blue square",  # 0 again, up to case and spacing: a positive
    "a dog running on the beach at night",
    "a dog running on the beach at noon",  # one word apart from 3
    "three apples in a bowl",
]


def test_neighbours_are_the_nearest_other_captions_never_the_same_one():
    near = caption_neighbours(CAPTIONS, k=2)
    assert near.shape == (6, 2)
    assert near[0, 0] == 1 and near[1, 0] in (0, 2) and near[3, 0] == 4 and near[4, 0] == 3
    ids = caption_ids(CAPTIONS)
    assert ids[0] == ids[2] != ids[1]
    for i, row in enumerate(near.tolist()):
        assert all(j != i and ids[j] != ids[i] for j in row if j >= 0)  # never itself, never a positive
    # word order counts (bigrams): the reordered caption is nearer than one with other words
    order = caption_neighbours(
        ["red circle left of blue square", "blue square left of red circle", "x y z"], k=1
    )
    assert order[0, 0] == 1


def test_fewer_candidates_than_k_are_marked_minus_one():
    near = caption_neighbours(["a cat", "a cat", "a dog"], k=3)
    assert (near[0] == torch.tensor([2, -1, -1])).all()
    assert caption_neighbours(["alone"], k=4).eq(-1).all()


def test_hard_batches_are_deterministic_and_bring_neighbours_of_their_seeds():
    n = 200
    valid = torch.ones(n, dtype=torch.bool)
    valid[7] = False  # an undecodable image is never drawn, as a seed or as a neighbour
    near = torch.stack([(torch.arange(n) + d) % n for d in (1, 2, 3)], dim=1)  # (N, 3): i+1, i+2, i+3
    plan = BatchPlan(valid, batch_size=16, seed=3, neighbours=near, mix=0.25)
    assert plan.n_seed == 12 and plan.per_epoch == 199 // 12
    for m in (0, 5, plan.per_epoch + 1):
        batch = plan(m)
        assert batch.shape == (16,) and torch.equal(
            batch, BatchPlan(valid, 16, 3, neighbours=near, mix=0.25)(m)
        )
        seeds, extra = batch[:12], batch[12:]
        offset = (extra - seeds[:4]) % n
        assert ((offset >= 1) & (offset <= 3)).all()  # each extra is a neighbour of its seed
        assert not (batch == 7).any()
    # one epoch walks every seed at most once
    epoch = torch.cat([plan(m)[:12] for m in range(plan.per_epoch)])
    assert len(epoch.unique()) == len(epoch)


def test_without_neighbours_the_plan_is_the_plain_permutation():
    valid = torch.ones(50, dtype=torch.bool)
    plain = BatchPlan(valid, 10, seed=1)
    assert plain.n_seed == 10 and len(torch.cat([plain(m) for m in range(5)]).unique()) == 50


def test_mined_neighbours_are_the_images_the_model_ranks_highest_for_each_caption():
    """A stand-in 'model' whose image and text features are fixed vectors: the mined neighbours of caption i
    must be the highest-scoring images by that score, never a positive (equal caption) or an invalid image."""
    from retrieval.train.neighbours import mined_neighbours

    torch.manual_seed(0)
    n, d = 12, 8
    feats = torch.nn.functional.normalize(torch.randn(n, d), dim=1)

    class Lookup(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def encode_image(self, x, normalize=True):
            return feats[x[:, 0, 0, 0].long()]  # the "image" carries its row index in its first pixel

        def encode_text(self, t, normalize=True):
            return feats[t[:, 0]]

    pixels = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
    pixels[:, 0, 0, 0] = torch.arange(n)
    tokens = torch.arange(n)[:, None].repeat(1, 4)
    ids = torch.arange(n)
    ids[5] = ids[4]  # rows 4 and 5 share a caption: positives of each other
    valid = torch.ones(n, dtype=torch.bool)
    valid[9] = False
    near = mined_neighbours(Lookup(), pixels, valid, tokens, ids, lambda p: p, k=3, batch=5)
    sims = feats @ feats.T
    for i in range(n):
        allowed = [j for j in range(n) if ids[j] != ids[i] and valid[j]]
        expected = sorted(allowed, key=lambda j: -float(sims[i, j]))[:3]
        assert near[i].tolist() == expected

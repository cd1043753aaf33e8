"""The captioner: vocabulary, decoder, generation (cache, beams, sampling, lengths), caption metrics."""

import math

import pytest
import torch

from retrieval.eval.captions import bleu4, caption_metrics, cider_d, synth_correct
from retrieval.losses.captioning import lm_loss, sequence_logprob
from retrieval.models.captioner import BOS, EOS, PAD, UNK, Captioner, CaptionerConfig, Vocab
from retrieval.models.encoders import create_clip
from retrieval.models.generate import GenerateConfig, generate_ids

CAPTIONS = ["a small red circle", "a large blue square to the left of a small red circle", "a green cross"]


@pytest.fixture(scope="module")
def model():
    clip, _ = create_clip("test-micro", "none", 0)
    torch.manual_seed(0)
    cfg = CaptionerConfig(width=32, layers=2, heads=2, max_len=16, dropout=0.0)
    return Captioner(clip, cfg, Vocab.build(CAPTIONS)).eval()


@pytest.fixture(scope="module")
def image_tokens(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 32, 32, generator=g)
    size = model.clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = torch.randn(3, 3, size, size, generator=g)
    # a sharper image signal than the untrained tower gives, so captions differ between images
    return model.image_tokens(x) * 5


def test_vocab_cut_to_training_words_and_unknown_words_tokenise():
    vocab = Vocab.build(CAPTIONS)
    assert set(vocab.itos[4:]) == {w for c in CAPTIONS for w in c.split()}
    ids = vocab(["a purple hexagon, left of a red circle"], max_len=12)[0].tolist()
    assert ids[0] == BOS and EOS in ids and UNK in ids and ids[-1] == PAD
    assert vocab.decode(vocab.encode("A red circle", 10)[1:]) == "a red circle"
    assert Vocab.build(CAPTIONS, max_size=6).itos == Vocab.build(CAPTIONS, max_size=6).itos  # deterministic
    assert len(Vocab.build(CAPTIONS, max_size=6)) == 6


def test_unknown_caption_still_scores(model):
    tokens = model.tokenize(["a purple hexagon", "a red circle"])  # (2, L)
    memory = model.decoder.memory(torch.zeros(2, 4, model.cfg.image_width))
    logits = model.decoder(tokens[:, :-1], memory)
    assert torch.isfinite(sequence_logprob(logits, tokens)).all()
    out = lm_loss(logits, tokens)
    assert out["lm"].ndim == 0 and torch.isfinite(out["lm"])


def test_kv_cache_gives_the_same_tokens(model, image_tokens):
    for cfg in (
        GenerateConfig(max_len=12),
        GenerateConfig(top_p=0.9, seed=3, max_len=12),
        GenerateConfig(beams=3),
    ):
        cached = generate_ids(model.decoder, image_tokens, cfg)
        plain = generate_ids(
            model.decoder, image_tokens, GenerateConfig(**{**cfg.__dict__, "use_cache": False})
        )
        assert cached == plain


def test_beam_of_one_is_greedy(model, image_tokens):
    assert generate_ids(model.decoder, image_tokens, GenerateConfig(beams=1)) == generate_ids(
        model.decoder, image_tokens, GenerateConfig()
    )
    # the explicit beam code path with one beam
    from retrieval.models.generate import _beam

    assert _beam(model.decoder, image_tokens, GenerateConfig(beams=1)) == generate_ids(
        model.decoder, image_tokens, GenerateConfig()
    )


def test_sampling_is_seeded(model, image_tokens):
    a = generate_ids(model.decoder, image_tokens, GenerateConfig(top_p=0.95, temperature=1.5, seed=7))
    b = generate_ids(model.decoder, image_tokens, GenerateConfig(top_p=0.95, temperature=1.5, seed=7))
    c = [
        generate_ids(model.decoder, image_tokens, GenerateConfig(top_p=0.95, temperature=1.5, seed=s))
        for s in range(8, 12)
    ]
    assert a == b and any(x != a for x in c)


@pytest.mark.parametrize("beams", [1, 2])
def test_min_and_max_length(model, image_tokens, beams):
    for lo, hi in ((3, 3), (5, 8), (1, 2)):
        for ids in generate_ids(
            model.decoder, image_tokens, GenerateConfig(min_len=lo, max_len=hi, beams=beams)
        ):
            assert lo <= len(ids) <= hi and EOS not in ids and BOS not in ids


def test_repetition_penalty_changes_nothing_at_one(model, image_tokens):
    base = generate_ids(model.decoder, image_tokens, GenerateConfig())
    assert generate_ids(model.decoder, image_tokens, GenerateConfig(repetition_penalty=1.0)) == base
    strong = generate_ids(model.decoder, image_tokens, GenerateConfig(repetition_penalty=50.0, max_len=6))
    assert all(len(set(ids)) >= min(len(ids), 2) for ids in strong)


def test_bleu4_and_cider_by_hand():
    refs = [["a small red circle"], ["a large blue square"]]
    cands = ["a small red circle", "a large blue circle"]
    # clipped precisions over the corpus: 7/8, 5/6, 3/4, 1/2; equal lengths: no brevity penalty
    assert bleu4(cands, refs) == pytest.approx((7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25)
    # CIDEr-D: image 1 matches its reference exactly (10); image 2's cosines per order are 2/3, 2/3, 1/2, 0
    # ("a" is in every reference: idf 0), so 10 * (11/6) / 4
    assert cider_d(cands, refs) == pytest.approx((10 + 10 * (2 / 3 + 2 / 3 + 1 / 2) / 4) / 2)
    assert bleu4(["a small"], [["a small red circle"]]) == 0.0  # no 3- or 4-gram at all
    shorter = bleu4(["a small red circle"], [["a small red circle on grey"]])
    assert shorter == pytest.approx(math.exp(1 - 6 / 4))


def test_synth_correctness_either_order():
    objects = [
        {"size": "small", "color": "red", "shape": "circle"},
        {"size": "large", "color": "blue", "shape": "square"},
    ]
    assert synth_correct("a small red circle to the left of a large blue square", objects, "left of")
    assert synth_correct("a large blue square to the right of a small red circle", objects, "left of")
    assert not synth_correct("a small red circle above a large blue square", objects, "left of")
    assert not synth_correct("a small red square to the left of a large blue circle", objects, "left of")
    assert not synth_correct("garbage", objects, "left of")
    m = caption_metrics(["a small red circle"], [["a small red circle"]], [([objects[0]], None)])
    assert m["synth_correct"] == 1.0 and m["bleu4"] == 1.0


def test_image_positions_tell_where_things_are(model, image_tokens):
    """With fixed 2D positions on the image tokens the decoder reads where a token sits (a relation's words
    depend on it); without them it sees a bag of tokens, the same whatever their order."""
    ids = torch.tensor([[BOS, 4, 5, 6]])
    tokens = image_tokens[:1]
    shuffled = tokens[:, torch.randperm(tokens.shape[1], generator=torch.Generator().manual_seed(0))]
    decoder = model.decoder
    assert decoder.cfg.image_positions
    with torch.no_grad():
        placed = decoder(ids, decoder.memory(tokens)), decoder(ids, decoder.memory(shuffled))
        decoder.cfg = CaptionerConfig(**{**decoder.cfg.__dict__, "image_positions": False})
        try:
            bag = decoder(ids, decoder.memory(tokens)), decoder(ids, decoder.memory(shuffled))
        finally:
            decoder.cfg = CaptionerConfig(**{**decoder.cfg.__dict__, "image_positions": True})
    assert not torch.allclose(*placed, atol=1e-4)
    torch.testing.assert_close(*bag, atol=1e-5, rtol=1e-5)

"""The torch-free text path of a cold search: CLIP's BPE tokenizer and the text tower in numpy give what
open_clip and torch give; what they cannot compute exactly is never cached."""

import random

import numpy as np
import open_clip
import pytest
import torch

from retrieval.config import EncoderConfig
from retrieval.models import text_numpy
from retrieval.models.clip_bpe import ClipBPE
from retrieval.models.encoders import load_encoder


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_bpe_tokenizer_gives_open_clips_ids():
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;:'\"!?-+()[]{}<>&#é東😀\t\n"
    texts = ["a red circle", "naïve café &amp; 東京 can't", "<start_of_text> hi", "", "word " * 100]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(300)]
    ours = ClipBPE()(texts)
    theirs = open_clip.get_tokenizer("ViT-B-32")(texts).numpy()
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("arch", ["test-micro", "tiny-cvit-64"])
def test_the_cached_numpy_tower_encodes_as_torch_does(arch):
    encoder = load_encoder(EncoderConfig(arch=arch, device="cpu", seed=5))
    assert text_numpy.load(encoder.identity) is None
    assert text_numpy.export(encoder)
    tower = text_numpy.load(encoder.identity)
    texts = ["a small red circle left of a large blue square", "dog + beach", "x " * 200]
    np.testing.assert_allclose(tower.encode(texts), encoder.encode_texts(texts).numpy(), atol=1e-5)
    # another seed is another model: its identity finds nothing
    other = load_encoder(EncoderConfig(arch=arch, device="cpu", seed=6))
    assert text_numpy.load(other.identity) is None


def test_a_tower_it_cannot_compute_exactly_is_not_cached(cache):
    encoder = load_encoder(EncoderConfig(arch="test-micro", device="cpu"))
    block = encoder.model.transformer.resblocks[0]
    block.mlp.gelu = torch.nn.GELU(approximate="tanh")  # not the exact GELU the numpy tower computes
    assert not text_numpy.export(encoder)
    assert text_numpy.load(encoder.identity) is None and not (cache / "retrieval" / "text-towers").exists()


def test_a_damaged_cache_entry_is_ignored(cache):
    encoder = load_encoder(EncoderConfig(arch="test-micro", device="cpu"))
    assert text_numpy.export(encoder)
    folder = cache / "retrieval" / "text-towers" / text_numpy.cache_key(encoder.identity)
    (folder / "tower.safetensors").write_bytes(b"garbage")
    assert text_numpy.load(encoder.identity) is None

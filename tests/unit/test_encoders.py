import json
import subprocess
import sys

import pytest
import torch

from retrieval.config import EncoderConfig
from retrieval.errors import UserError
from retrieval.models.checkpoint import load_dual_encoder, read_config, save_checkpoint
from retrieval.models.encoders import create_clip, list_presets, load_encoder

TINY = EncoderConfig(arch="test-micro", device="cpu")
PRESETS = ["test-micro", "tiny-vit-64", "tiny-cvit-64", "tiny-cvit-64-p16", "effnet-lite0-128"]


def test_presets_are_registered_with_open_clip():
    import open_clip

    assert set(PRESETS) == set(list_presets())  # not stems.json
    assert set(list_presets()) <= set(open_clip.list_models())


@pytest.mark.parametrize("arch", PRESETS)
def test_every_preset_encodes_normalised_finite_vectors(arch):
    enc = load_encoder(EncoderConfig(arch=arch, device="cpu"))
    images = torch.randint(0, 255, (3, 3, enc.image_size, enc.image_size), dtype=torch.uint8)
    img = enc.encode_images(images)
    txt = enc.encode_texts(["a red circle", "a blue square"])
    assert img.shape == (3, enc.embed_dim) and txt.shape == (2, enc.embed_dim)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))


def test_random_init_is_the_same_in_every_process():
    """Index in one process, search in another: the vectors must come from the same weights."""
    code = (
        "from retrieval.config import EncoderConfig; from retrieval.models.encoders import load_encoder;"
        "e = load_encoder(EncoderConfig(arch='test-micro', device='cpu', seed=3));"
        "print(e.encode_texts(['a dog'])[0, :4].tolist())"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True) for _ in "ab"
    ]
    assert runs[0].stdout == runs[1].stdout
    here = load_encoder(EncoderConfig(arch="test-micro", device="cpu", seed=3)).encode_texts(["a dog"])[0, :4]
    torch.testing.assert_close(here, torch.tensor(json.loads(runs[0].stdout)))
    other = load_encoder(EncoderConfig(arch="test-micro", device="cpu", seed=4)).encode_texts(["a dog"])[
        0, :4
    ]
    assert not torch.allclose(here, other)


def test_seeding_does_not_leak_into_the_callers_rng():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    create_clip("test-micro", "none", seed=0)
    assert torch.equal(torch.rand(1), expected)


def test_checkpoint_round_trip_and_identity(tmp_path):
    model, _ = create_clip("test-micro", "none", seed=5)
    save_checkpoint(tmp_path / "ck", "test-micro", {"dual_encoder": model}, extra={"training": {"steps": 1}})
    cfg = read_config(tmp_path / "ck")
    assert cfg["components"] == {"dual_encoder": "dual_encoder.safetensors"} and cfg["training"] == {
        "steps": 1
    }
    loaded, arch, weights = load_dual_encoder(tmp_path / "ck")
    assert arch == "test-micro" and weights.startswith("checkpoint:")
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    enc = load_encoder(EncoderConfig(checkpoint=str(tmp_path / "ck"), device="cpu"))
    assert enc.identity["weights"] == weights and enc.identity["source"]["checkpoint"].endswith("ck")


def test_a_checkpoint_carries_its_architecture(tmp_path):
    model, _ = create_clip("test-micro", "none")
    save_checkpoint(tmp_path, "test-micro", {"dual_encoder": model})
    data = json.loads((tmp_path / "config.json").read_text())
    data["arch"] = "never-registered-arch"
    (tmp_path / "config.json").write_text(json.dumps(data))
    _, arch, _ = load_dual_encoder(tmp_path)
    assert arch == "never-registered-arch"


def test_local_weights_file(tmp_path):
    from safetensors.torch import save_model

    model, _ = create_clip("test-micro", "none", seed=7)
    save_model(model, str(tmp_path / "w.safetensors"))
    enc = load_encoder(
        EncoderConfig(arch="test-micro", pretrained=str(tmp_path / "w.safetensors"), device="cpu")
    )
    assert enc.identity["weights"].startswith("file:")
    torch.testing.assert_close(enc.model.text_projection, model.text_projection)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (EncoderConfig(arch="ViT-B-33", device="cpu"), "unknown model architecture 'ViT-B-33'.*ViT-B-32"),
        (
            EncoderConfig(arch="test-micro", pretrained="laion9000", device="cpu"),
            "not a file and not a pretrained tag",
        ),
        (
            EncoderConfig(arch="test-micro", checkpoint="/nonexistent", device="cpu"),
            "not a checkpoint directory",
        ),
        (EncoderConfig(arch="test-micro", device="cuda:7"), "CUDA is not available"),
    ],
)
def test_bad_model_flags_are_one_line_errors(cfg, message):
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match=message):
        load_encoder(cfg)


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_a_text_query_reads_only_the_text_side_and_encodes_the_same(tmp_path, suffix):
    """Search loads a text-only encoder (no image tower read, no random init): its text vectors are the full
    encoder's, bit for bit, and it refuses to encode images rather than answer from uninitialised weights."""
    from safetensors.torch import save_model

    model, _ = create_clip("test-micro", "none", seed=7)
    weights = tmp_path / f"w.{suffix}"
    save_model(model, str(weights)) if suffix == "safetensors" else torch.save(model.state_dict(), weights)
    ck = tmp_path / "ck"
    save_checkpoint(ck, "test-micro", {"dual_encoder": model})
    for cfg in (
        EncoderConfig(arch="test-micro", pretrained=str(weights), device="cpu"),
        EncoderConfig(checkpoint=str(ck), device="cpu"),
    ):
        full, text = load_encoder(cfg), load_encoder(cfg, text_only=True)
        assert text.text_only and not full.text_only and text.identity == full.identity
        texts = ["a red circle", "two blue squares left of a cat"]
        assert torch.equal(text.encode_texts(texts), full.encode_texts(texts))
        with pytest.raises(RuntimeError, match="text only"):
            text.encode_images(torch.zeros(1, 3, text.image_size, text.image_size, dtype=torch.uint8))


def test_weights_loaded_without_random_init_are_the_weights(tmp_path):
    """skip_init leaves weights uninitialised: only safe because every one is loaded next; checked here."""
    from retrieval.models.encoders import create_untrained

    torch.manual_seed(0)
    source = create_untrained("tiny-vit-64")
    fast = create_untrained("tiny-vit-64", init=False)
    fast.load_state_dict(source.state_dict())
    for (name, a), b in zip(source.state_dict().items(), fast.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_file_digests_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
    import os

    from retrieval.models import loading

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 1000)
    first = loading.cached_digest(path)
    assert (tmp_path / "cache" / "retrieval" / "digests.json").exists()
    calls = []
    monkeypatch.setattr(loading, "_digest", lambda p: calls.append(p) or "recomputed")
    assert loading.cached_digest(path) == first and not calls  # same size, mtime and inode: remembered
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(1, 1))  # another mtime even on a coarse clock
    assert loading.cached_digest(path) == "recomputed" and len(calls) == 1
    (tmp_path / "cache" / "retrieval" / "digests.json").write_text("not json")
    assert loading.cached_digest(path) == "recomputed"  # a damaged cache is only slower

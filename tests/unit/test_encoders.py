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


def test_presets_are_registered_with_open_clip():
    import open_clip

    assert {"test-micro", "tiny-vit-64", "tiny-cvit-64"} == set(list_presets())  # not stems.json
    assert set(list_presets()) <= set(open_clip.list_models())


@pytest.mark.parametrize("arch", ["test-micro", "tiny-vit-64", "tiny-cvit-64"])
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

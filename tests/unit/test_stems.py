"""The conv stem: same contract as the patchify layer it replaces, recorded in checkpoints, old ones unaffected."""

import json

import open_clip
import pytest
import torch

from retrieval.models.checkpoint import load_dual_encoder, save_checkpoint
from retrieval.models.encoders import create_clip, create_untrained
from retrieval.models.stems import ConvStem, apply_conv_stem, preset_stem, stem_channels


def test_stem_has_the_patchify_layers_output_shape():
    plain = create_untrained("tiny-vit-64")
    stemmed = create_untrained("tiny-vit-64", stem=(8, 16, 32))
    x = torch.randn(2, 3, 64, 64)
    assert isinstance(stemmed.visual.conv1, ConvStem) and not isinstance(plain.visual.conv1, ConvStem)
    assert stemmed.visual.conv1(x).shape == plain.visual.conv1(x).shape == (2, 128, 8, 8)
    assert stemmed.encode_image(x).shape == plain.encode_image(x).shape


def test_stem_stride_must_match_the_patch_size():
    with pytest.raises(ValueError, match="patch size of 8"):
        apply_conv_stem(create_untrained("tiny-vit-64"), (16, 32))


def test_the_default_training_preset_declares_its_stem():
    assert preset_stem("tiny-cvit-64") is not None and preset_stem("tiny-vit-64") is None
    model, _ = create_clip("tiny-cvit-64")
    assert stem_channels(model) == preset_stem("tiny-cvit-64")
    pos = model.visual.positional_embedding
    assert not pos.requires_grad and pos.abs().sum() > 0  # fixed 2D sin-cos positions


def test_checkpoint_records_the_stem_and_reloads_the_same_function(tmp_path):
    model, _ = create_clip("tiny-vit-64", seed=1)
    apply_conv_stem(model, (8, 16, 32))
    save_checkpoint(tmp_path, "tiny-vit-64", {"dual_encoder": model})
    assert json.loads((tmp_path / "config.json").read_text())["vision_stem"] == [8, 16, 32]
    loaded, arch, _ = load_dual_encoder(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.eval().encode_image(x), model.eval().encode_image(x))


def test_a_checkpoint_keeps_its_architecture_when_the_preset_changes(tmp_path):
    """Old checkpoints have no vision_stem key, and their model_cfg may differ from today's preset of that name."""
    model, _ = create_clip("tiny-vit-64", seed=2)
    save_checkpoint(tmp_path, "tiny-vit-64", {"dual_encoder": model})
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("vision_stem")
    config["model_cfg"]["vision_cfg"]["layers"] = 2  # what an older toolkit called tiny-vit-64
    (tmp_path / "config.json").write_text(json.dumps(config))
    old = create_clip("tiny-vit-64", seed=2)[0]
    old.visual.transformer.resblocks = old.visual.transformer.resblocks[:2]
    old.visual.transformer.layers = 2
    save_checkpoint(tmp_path / "w", "tiny-vit-64", {"dual_encoder": old})
    (tmp_path / "dual_encoder.safetensors").write_bytes(
        (tmp_path / "w" / "dual_encoder.safetensors").read_bytes()
    )
    loaded, arch, _ = load_dual_encoder(tmp_path)
    assert arch == "tiny-vit-64" and len(loaded.visual.transformer.resblocks) == 2
    assert not isinstance(loaded.visual.conv1, ConvStem)
    assert open_clip.get_model_config("tiny-vit-64")["vision_cfg"]["layers"] == 4  # the preset is untouched


def test_fusion_of_an_older_checkpoint_keeps_its_options(tmp_path):
    """A fusion saved before image positions, the EOT readout and the pooled-feature token existed must load as
    it was trained."""
    import dataclasses

    from retrieval.models.albef import AlbefModel, load_albef
    from retrieval.models.fusion import FusionConfig

    model = AlbefModel(create_clip("test-micro")[0], FusionConfig(width=32, layers=1, heads=2))
    fusion = dataclasses.asdict(model.fusion_cfg)
    for key in ("image_positions", "readout", "global_token", "global_width"):
        fusion.pop(key)
    save_checkpoint(
        tmp_path, "test-micro", {"dual_encoder": model.clip, "fusion": model.fusion}, {"fusion": fusion}
    )
    loaded, _ = load_albef(tmp_path)
    assert loaded.fusion_cfg.image_positions is False and loaded.fusion_cfg.readout == "first"
    assert loaded.fusion_cfg.global_token is False and loaded.fusion.global_proj is None
    fusion["image_positions"] = True
    save_checkpoint(
        tmp_path, "test-micro", {"dual_encoder": model.clip, "fusion": model.fusion}, {"fusion": fusion}
    )
    assert load_albef(tmp_path)[0].fusion_cfg.image_positions is True

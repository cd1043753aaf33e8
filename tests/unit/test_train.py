import json

import pytest
import torch
from safetensors.torch import load_file

from retrieval.data.synth import SynthConfig, generate
from retrieval.errors import UserError
from retrieval.train.config import load_train_config
from retrieval.train.loop import train

TINY = [
    "model.arch=test-micro",
    "model.fusion.width=32",
    "model.fusion.layers=1",
    "model.fusion.heads=2",
    "batch_size=16",
    "log_every=1",
    "save_every=2",
    "optim.warmup_steps=2",
]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    generate(out, SynthConfig(n=80, image_size=48), progress=False)
    return out


def test_set_overrides_are_typed_and_unknown_keys_refused():
    cfg = load_train_config(
        None, ["steps=7", "objectives.negatives=random", "optim.lr=1", "model.fusion.width=64"]
    )
    assert cfg.steps == 7 and cfg.objectives.negatives == "random" and cfg.optim.lr == 1.0
    assert cfg.model.fusion.width == 64
    with pytest.raises(UserError, match="no key 'negatvies'"):
        load_train_config(None, ["objectives.negatvies=hard"])
    with pytest.raises(UserError, match="expected"):
        load_train_config(None, ["steps=many"])
    with pytest.raises(UserError, match="hard or random"):
        load_train_config(None, ["objectives.negatives=easy"])


def test_config_file_with_unknown_key_is_refused(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"optim": {"lr": 0.1, "momentum": 3}}))
    with pytest.raises(UserError, match="momentum"):
        load_train_config(tmp_path / "c.json")


def _weights(path):
    return {
        **load_file(str(path / "dual_encoder.safetensors")),
        **load_file(str(path / "fusion.safetensors")),
    }


@pytest.mark.parametrize(
    "extra", [[], ["objectives.distill=true", "objectives.queue_size=40", "objectives.text_negatives=true"]]
)
def test_resume_continues_exactly_where_it_stopped(scenes, tmp_path, extra):
    cfg = load_train_config(None, [*TINY, "steps=6", *extra])
    train(str(scenes / "train.jsonl"), tmp_path / "straight", cfg, progress=False)
    train(str(scenes / "train.jsonl"), tmp_path / "split", cfg, progress=False, stop_after=3)
    with pytest.raises(UserError, match="--resume"):
        train(str(scenes / "train.jsonl"), tmp_path / "split", cfg, progress=False)
    train(str(scenes / "train.jsonl"), tmp_path / "split", cfg, progress=False, resume=True)

    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    log_a = [json.loads(x) for x in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]


def test_training_lowers_the_loss_and_writes_a_usable_checkpoint(scenes, tmp_path):
    from retrieval.config import EncoderConfig
    from retrieval.models.albef import load_albef
    from retrieval.models.encoders import load_encoder

    cfg = load_train_config(None, [*TINY, "steps=30", "optim.lr=3e-3"])
    train(str(scenes / "train.jsonl"), tmp_path / "ck", cfg, progress=False)
    log = [json.loads(x) for x in (tmp_path / "ck" / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    first, last = sum(r["itc"] for r in log[:5]) / 5, sum(r["itc"] for r in log[-5:]) / 5
    assert last < first
    assert {"temperature", "lr", "samples_per_s", "itm", "itm_acc"} <= log[-1].keys()
    enc = load_encoder(EncoderConfig(checkpoint=str(tmp_path / "ck"), device="cpu"))
    assert enc.identity["arch"] == "test-micro"
    model, arch = load_albef(tmp_path / "ck")
    assert arch == "test-micro" and model.fusion_cfg.width == 32


def test_itc_only_checkpoint_has_no_itm_head(scenes, tmp_path):
    cfg = load_train_config(None, [*TINY, "steps=2", "objectives.itm=false"])
    train(str(scenes / "train.jsonl"), tmp_path / "ck", cfg, progress=False)
    log = json.loads((tmp_path / "ck" / "log.jsonl").read_text().splitlines()[-1])
    assert "itm" not in log and "itc" in log
    from retrieval.models.albef import load_albef

    with pytest.raises(UserError, match="no ITM head"):
        load_albef(tmp_path / "ck")


def test_param_groups_give_the_fusion_its_own_rate_and_spare_norms_from_decay():
    from retrieval.models.albef import AlbefModel
    from retrieval.models.encoders import create_clip
    from retrieval.models.fusion import FusionConfig
    from retrieval.train.loop import param_groups

    clip, _ = create_clip("test-micro", "none")
    model = AlbefModel(clip, FusionConfig(width=16, layers=1, heads=2))
    groups = param_groups(model, 0.05, lr=1e-3, fusion_lr=2e-4)
    fusion_ids = {id(p) for p in model.fusion.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for g in groups:
        in_fusion = {id(p) in fusion_ids for p in g["params"]}
        assert len(in_fusion) == 1  # a group is all fusion or all towers
        assert g["lr"] == (2e-4 if in_fusion.pop() else 1e-3)
        if g["weight_decay"]:
            assert all(p.ndim >= 2 for p in g["params"])  # norms and biases are never decayed
    assert all(g["lr"] == 1e-3 for g in param_groups(model, 0.05, lr=1e-3))

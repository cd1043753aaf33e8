import json

import pytest
import torch
from safetensors.torch import load_file

from retrieval.data.synth import SynthConfig, generate
from retrieval.errors import UserError
from retrieval.train.config import load_train_config
from retrieval.train.loop import train
from retrieval.train.refine_cache import RefineCache
from tests.tiny_train import TINY_MODEL

TINY = [
    *TINY_MODEL,
    "save_every=2",
    "refine.steps=0",
    "objectives.joint_itm=true",  # these tests train ITM in the joint run; the default leaves it to the stage
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


def test_without_joint_itm_the_fusion_trains_only_in_the_stage_and_is_saved_only_after_it(scenes, tmp_path):
    from retrieval.models.albef import load_albef

    data = str(scenes / "train.jsonl")
    with pytest.raises(UserError, match="never train"):
        load_train_config(None, [*TINY, "objectives.joint_itm=false"])  # TINY has refine.steps=0
    cfg = load_train_config(None, [*TINY, "steps=4", "objectives.joint_itm=false", "refine.steps=2"])
    train(data, tmp_path / "ck", cfg, progress=False, stop_after=2)
    log = [json.loads(x) for x in (tmp_path / "ck" / "log.jsonl").read_text().splitlines()]
    assert all("itm" not in r and "itc" in r for r in log)  # no fusion pass in the joint steps
    with pytest.raises(UserError, match="refinement stage"):  # an untrained ITM head is never saved
        load_albef(tmp_path / "ck")
    train(data, tmp_path / "ck", cfg, progress=False, resume=True)
    log = [json.loads(x) for x in (tmp_path / "ck" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all("itm" in r for r in log if r.get("stage") == "refine")
    model, _ = load_albef(tmp_path / "ck")
    assert model.fusion_cfg.width == 32


def test_param_groups_give_the_fusion_its_own_rate_and_spare_norms_from_decay():
    from retrieval.models.albef import AlbefModel
    from retrieval.models.encoders import create_clip
    from retrieval.models.fusion import FusionConfig
    from retrieval.train.optim import param_groups

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
    # a pretrained image tower (model.image_weights) at its own rate, the text tower and fusion at theirs
    visual_ids = {id(p) for p in model.clip.visual.parameters()}
    for g in param_groups(model, 0.05, lr=1e-3, fusion_lr=2e-4, image_lr=1e-4):
        kinds = {
            "visual" if id(p) in visual_ids else "fusion" if id(p) in fusion_ids else "text"
            for p in g["params"]
        }
        assert len(kinds) == 1 and g["lr"] == {"visual": 1e-4, "fusion": 2e-4, "text": 1e-3}[kinds.pop()]


def test_refine_stage_trains_only_the_fusion_and_a_resume_redoes_an_unfinished_one(scenes, tmp_path):
    data = str(scenes / "train.jsonl")
    joint = [*TINY, "steps=4", "objectives.text_negatives=true"]
    refine = [*joint, "refine.steps=3", "refine.batch_size=8"]
    train(data, tmp_path / "joint", load_train_config(None, joint), progress=False)
    train(data, tmp_path / "refined", load_train_config(None, refine), progress=False)
    before, after = _weights(tmp_path / "joint"), _weights(tmp_path / "refined")
    towers = [k for k in load_file(str(tmp_path / "joint" / "dual_encoder.safetensors"))]
    for k in towers:  # the towers are frozen during the stage
        torch.testing.assert_close(before[k], after[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(before[k], after[k]) for k in after.keys() - set(towers))
    log = [json.loads(x) for x in (tmp_path / "refined" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6, 7]
    stage = [r for r in log if r.get("stage") == "refine"]
    assert len(stage) == 3 and all({"itm", "itm_acc", "loss"} <= r.keys() for r in stage)
    assert any("rank_relation" in r or "rank_binding" in r for r in stage)
    assert any("rank_mirror" in r for r in stage)  # mirror twins of the directional captions, ranked
    assert any("rank_square_caption" in r and "rank_square_image" in r for r in stage)  # and their squares
    config = json.loads((tmp_path / "refined" / "config.json").read_text())
    assert config["training"]["refined"] is True and config["training"]["step"] == 4

    # a run whose joint part finished but whose stage did not (killed in it): --resume refines, the same way
    cfg = load_train_config(None, refine)
    train(data, tmp_path / "joint", cfg, progress=False, resume=True)
    again = _weights(tmp_path / "joint")
    for k in after:
        torch.testing.assert_close(again[k], after[k], rtol=0, atol=0, msg=k)
    # and once refined, a resume has nothing left to do
    lines = (tmp_path / "joint" / "log.jsonl").read_text()
    train(data, tmp_path / "joint", cfg, progress=False, resume=True)
    assert (tmp_path / "joint" / "log.jsonl").read_text() == lines
    for k, v in _weights(tmp_path / "joint").items():
        torch.testing.assert_close(v, after[k], rtol=0, atol=0, msg=k)


def test_with_distillation_the_refine_stage_draws_pairs_by_the_momentum_models_belief(tmp_path):
    generate(tmp_path / "noisy", SynthConfig(n=80, image_size=48, noise=0.5), progress=False)
    data = str(tmp_path / "noisy" / "train.jsonl")
    base = [*TINY, "steps=2", "objectives.distill=true", "objectives.queue_size=40", "refine.batch_size=8"]
    seen: list = []
    real = RefineCache.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(self.weight)

    fusion = {}
    for sampling in ("true", "false"):
        cfg = load_train_config(None, [*base, "refine.steps=2", f"refine.teacher_sampling={sampling}"])
        with pytest.MonkeyPatch.context() as m:
            m.setattr(RefineCache, "__init__", spy)
            train(data, tmp_path / sampling, cfg, progress=False)
        fusion[sampling] = load_file(str(tmp_path / sampling / "fusion.safetensors"))
    belief, uniform = seen
    assert uniform is None and belief is not None  # no teacher: every cached pair as likely as any other
    assert belief.ndim == 1 and len(belief) > 8 and bool(((belief > 0) & (belief <= 1)).all())
    # the same joint run, then other pairs drawn: another fusion encoder
    assert any(not torch.equal(fusion["true"][k], fusion["false"][k]) for k in fusion["true"])


def test_refine_reset_fusion_starts_the_stage_from_a_fresh_seeded_fusion(scenes, tmp_path):
    data = str(scenes / "train.jsonl")
    # lr ~0: what the stage leaves is what it started from
    base = [*TINY, "steps=2", "refine.steps=1", "refine.batch_size=8", "refine.lr=1e-12"]
    fusion = {}
    for name, reset in (("kept", "false"), ("fresh", "true"), ("again", "true")):
        cfg = load_train_config(None, [*base, f"refine.reset_fusion={reset}"])
        train(data, tmp_path / name, cfg, progress=False)
        fusion[name] = load_file(str(tmp_path / name / "fusion.safetensors"))
    kept, fresh = fusion["kept"], fusion["fresh"]
    ln = [k for k in fresh if k.startswith("ln_out.")]
    assert ln and all(not torch.equal(kept[k], fresh[k]) for k in ln)  # the joint run had moved them
    torch.testing.assert_close(
        fresh["ln_out.weight"], torch.ones_like(fresh["ln_out.weight"]), atol=1e-6, rtol=0
    )
    assert not torch.equal(kept["itm_head.weight"], fresh["itm_head.weight"])
    for k in fresh:  # seeded: the same fresh start every time
        torch.testing.assert_close(fusion["again"][k], fresh[k], rtol=0, atol=0, msg=k)


def test_refine_confusers_are_the_top_scored_images_of_other_captions_and_join_the_batch():
    from types import SimpleNamespace

    from retrieval.train.refine import _pick
    from retrieval.train.refine_cache import confusers

    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(12, 8), dim=-1)  # (n, D)
    slot = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])  # rows 0 and 1: one caption, positives
    text = image[slot.clamp(max=11)] + 0.01  # (n, D) each row's caption sits near its own image
    found = confusers(image, text, slot, k=3)
    assert found.shape == (12, 3)
    for r in range(12):
        sims = text[r] @ image.T  # (n,)
        sims[slot == slot[r]] = float("-inf")
        assert found[r].tolist() == sims.topk(3).indices.tolist()  # the best-scored other captions' images
        assert slot[r] not in slot[found[r]].tolist()  # never a positive
    assert confusers(image, text, slot, k=0) is None

    class Cache(SimpleNamespace):
        def __len__(self) -> int:
            return 12

    cache = Cache(confusers=found, weight=None)
    g = torch.Generator().manual_seed(0)
    pick = _pick(cache, 8, 0.5, g)
    assert len(pick) == 8 and len(set(pick.tolist())) == 8
    anchors, joined = pick[:4].tolist(), pick[4:].tolist()
    assert sum(j in found[a].tolist() for a in anchors for j in joined) >= 3  # confusers of the anchors

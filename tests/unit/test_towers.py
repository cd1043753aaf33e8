"""Every OpenCLIP tower family trains ITC + ITM on a tiny config built here (timm's test models, a Hugging Face
text tower from a config and a tokenizer made on the spot: nothing is downloaded); what cannot be read is
refused at the start of training with one line."""

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.data.synth import SynthConfig, generate
from retrieval.errors import UserError
from retrieval.models.albef import AlbefModel
from retrieval.models.checkpoint import load_dual_encoder, save_checkpoint
from retrieval.models.encoders import create_clip
from retrieval.models.fusion import FusionConfig
from retrieval.models.towers import check_towers, encode_image_tokens, encode_text_tokens, text_mask
from retrieval.train.config import ObjectiveConfig, load_train_config
from retrieval.train.tasks import ItcItmTask

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
VIT = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
TIMM = {"image_size": 32, "timm_model_pretrained": False, "timm_proj": "linear"}
WORDS = "a red blue green small large circle square triangle to the left right of above below".split()


def _hf_tower(folder) -> dict:
    """A 1-layer BERT config and a word-level tokenizer saved where open_clip's HF adapter can load them; the
    pad id is 1 (as RoBERTa's), so nothing can lean on OpenCLIP's pad id 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, PreTrainedTokenizerFast

    special = ["[CLS]", "[PAD]", "[SEP]", "[UNK]"]
    vocab = {w: i for i, w in enumerate([*special, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 0), ("[SEP]", 2)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    ).save_pretrained(folder)
    BertConfig(
        vocab_size=len(vocab),
        hidden_size=24,  # not the fusion's or the embedding's width: each must be read from the tower
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        pad_token_id=1,
    ).save_pretrained(folder)
    return {
        "hf_model_name": str(folder),
        "hf_tokenizer_name": str(folder),
        "hf_proj_type": "linear",
        "hf_pooler_type": "mean_pooler",
        "context_length": 16,
    }


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, str]:
    """family -> a registered architecture name."""
    pytest.importorskip("timm")
    root = tmp_path_factory.mktemp("families")
    configs = {
        "resnet": {"vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32}},
        "timm-vit": {"vision_cfg": {**TIMM, "timm_model_name": "test_vit", "timm_pool": "token"}},
        "timm-convnet": {"vision_cfg": {**TIMM, "timm_model_name": "test_convnext", "timm_pool": "avg"}},
        # a head conv after the last stage: the tokens are narrower than the trunk's num_features
        "timm-efficientnet": {
            "vision_cfg": {**TIMM, "timm_model_name": "test_efficientnet", "timm_pool": "avg"}
        },
        "custom-text": {  # CustomTextCLIP's TextTransformer, bidirectional with last-token pooling (SigLIP's)
            "custom_text": True,
            "text_cfg": {**TEXT, "no_causal_mask": True, "pool_type": "last", "proj_bias": True},
        },
        "hf-text": {"text_cfg": _hf_tower(root / "hf")},
        "coca": {  # CoCa's towers: attention-pooled image tokens, a text tower with an appended class token
            "custom_text": True,
            "vision_cfg": {**VIT, "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
            "text_cfg": {**TEXT, "embed_cls": True, "output_tokens": True},
            "multimodal_cfg": {**TEXT, "attn_pooler_heads": 2},
        },
    }
    for family, cfg in configs.items():
        full = {"embed_dim": 32, "vision_cfg": VIT, "text_cfg": TEXT, **cfg}
        (root / f"family-{family}.json").write_text(json.dumps(full))
    open_clip.add_model_config(root)
    return {"vit": "test-micro", **{f: f"family-{f}" for f in configs}}


FAMILIES = [
    "vit",
    "resnet",
    "timm-vit",
    "timm-convnet",
    "timm-efficientnet",
    "custom-text",
    "hf-text",
    "coca",
]


def _batch(arch: str, clip: nn.Module, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    size = clip.visual.image_size
    side = int(size[0] if isinstance(size, (tuple, list)) else size)
    images = torch.randn(n, 3, side, side)
    captions = ["a red circle", "a large blue square", "a green triangle to the left of a red circle", "a"]
    return images, open_clip.get_tokenizer(arch)(captions[:n])


@pytest.mark.parametrize("family", FAMILIES)
def test_one_itc_itm_step_trains_every_family(families, family):
    arch = families[family]
    clip, _ = create_clip(arch, "none", seed=0)
    check_towers(clip, arch, itm=True)  # no refusal
    model = AlbefModel(clip, FusionConfig(width=32, layers=1, heads=2))
    task = ItcItmTask(model, ObjectiveConfig(joint_itm=True, distill=True, queue_size=8))
    images, text = _batch(arch, clip)
    before = {n: p.detach().clone() for n, p in task.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
    losses = task(images, text, torch.arange(len(text)))
    assert torch.isfinite(losses["loss"]) and {"itc", "itm"} <= losses.keys()
    losses["loss"].backward()
    opt.step()
    moved = {
        n.split(".")[2] for n, p in task.named_parameters() if n in before and not torch.equal(p, before[n])
    }
    # both towers (visual, and text or the CLIP's own text parts) and the fusion encoder learned something
    assert "visual" in moved and moved & {"text", "transformer", "token_embedding"}, moved
    assert any(
        n.startswith("model.fusion.") and not torch.equal(p, before[n]) for n, p in task.named_parameters()
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_token_path_gives_the_towers_own_features(families, family):
    """The pooled features beside the token states are exactly what encode_image / encode_text give, so ITC
    trained through them is the model a search later uses."""
    arch = families[family]
    clip, _ = create_clip(arch, "none", seed=1)
    clip.eval()
    images, text = _batch(arch, clip)

    def same(ours, theirs):  # ITC compares directions
        torch.testing.assert_close(F.normalize(ours, dim=-1), theirs, atol=1e-5, rtol=1e-4)

    with torch.no_grad():
        pooled, tokens = encode_image_tokens(clip, images)
        same(pooled, clip.encode_image(images, normalize=True))
        assert tokens.dim() == 3 and tokens.shape[0] == len(images)
        pooled, states = encode_text_tokens(clip, text, trim=True)
        same(pooled, clip.encode_text(text, normalize=True))
        mask = text_mask(clip, text[:, : states.shape[1]])  # (B, L')
        assert mask[:, 0].all() and mask.sum(1).tolist() == text_mask(clip, text).sum(1).tolist()


@pytest.mark.parametrize("family", ["resnet", "hf-text"])
def test_a_checkpoint_of_each_family_loads_offline(families, family, tmp_path):
    arch = families[family]
    clip, _ = create_clip(arch, "none", seed=2)
    save_checkpoint(tmp_path, arch, {"dual_encoder": clip})
    loaded, name, _ = load_dual_encoder(tmp_path)
    images, text = _batch(arch, clip)
    clip.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(text), clip.encode_text(text))
        torch.testing.assert_close(loaded.encode_image(images), clip.encode_image(images))


class _OpaqueVision(nn.Module):
    """A vision tower of no family towers.py reads: pooled features only."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.image_size = 16
        self.preprocess_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
        self.proj = nn.Linear(3, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.mean(dim=(2, 3)))  # (B, D)


def test_towers_without_token_states_train_itc_and_refuse_itm_in_one_line():
    clip, _ = create_clip("test-micro", "none")
    clip.visual = _OpaqueVision(32)
    with pytest.raises(UserError) as e:
        check_towers(clip, "my-arch", itm=True)
    message = str(e.value)
    assert "\n" not in message and "my-arch" in message and "_OpaqueVision" in message
    assert "objectives.itm=false" in message
    check_towers(clip, "my-arch", itm=False)
    model = AlbefModel(clip, FusionConfig(width=32, layers=1, heads=2))
    task = ItcItmTask(model, ObjectiveConfig(itm=False))
    losses = task(
        torch.randn(4, 3, 16, 16), open_clip.get_tokenizer("test-micro")(["a"] * 4), torch.arange(4)
    )
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and clip.visual.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["hf-text"])
def test_train_runs_end_to_end_on_other_families(families, family, tmp_path):
    """The training loop, its refinement stage and the checkpoint it writes, on a family with another
    tokenizer (pad id 1)."""
    from retrieval.train.loop import train

    generate(tmp_path / "scenes", SynthConfig(n=24, image_size=32, workers=1), progress=False)
    sets = [
        f"model.arch={families[family]}",
        "model.fusion.width=32",
        "model.fusion.layers=1",
        "model.fusion.heads=2",
        "batch_size=8",
        "steps=2",
        "refine.steps=1",
        "refine.batch_size=4",
    ]
    result = train(
        str(tmp_path / "scenes" / "train.jsonl"),
        tmp_path / "ck",
        load_train_config(None, sets),
        progress=False,
    )
    assert result["steps"] == 2
    assert (tmp_path / "ck" / "fusion.safetensors").is_file()


def test_image_weights_load_by_name_or_by_position_and_refuse_other_networks(families, tmp_path):
    """model.image_weights: a trunk's state dict under its own names (with a checkpoint's prefix), or under
    another code base's names in the same order with a classifier left over, loads exactly; weights of another
    network are a one-line error naming the file."""
    from safetensors.torch import save_file

    from retrieval.models.image_weights import load_image_weights, target

    arch = families["timm-efficientnet"]
    source, _ = create_clip(arch, "none", seed=3)
    trunk = {k: v.clone() for k, v in target(source).state_dict().items()}

    named = tmp_path / "named.pt"
    torch.save({f"module.{k}": v for k, v in trunk.items()}, named)
    renamed = {f"_layer{i:03d}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(trunk.items())}
    renamed["_fc.weight"] = torch.randn(10, 7)
    positional = tmp_path / "positional.pt"
    torch.save(renamed, positional)
    save_file(renamed, str(tmp_path / "unordered.safetensors"))  # safetensors keeps no order: names only

    for path, how in ((named, "names"), (positional, "position")):
        clip, _ = create_clip(arch, "none", seed=4)
        assert not all(torch.equal(v, target(clip).state_dict()[k]) for k, v in trunk.items())
        assert load_image_weights(clip, path) == how
        loaded = target(clip).state_dict()
        assert all(torch.equal(v, loaded[k]) for k, v in trunk.items())

    other = tmp_path / "other.pt"
    torch.save(create_clip(families["timm-convnet"], "none")[0].visual.trunk.state_dict(), other)
    clip, _ = create_clip(arch, "none", seed=4)
    with pytest.raises(UserError, match="other.pt.*not weights of this architecture"):
        load_image_weights(clip, other)
    with pytest.raises(UserError, match="unordered.safetensors.*names"):
        load_image_weights(clip, tmp_path / "unordered.safetensors")
    with pytest.raises(UserError, match="no such file"):
        load_image_weights(clip, tmp_path / "missing.pt")

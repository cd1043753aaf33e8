"""Evaluation beyond synth: binding on caption + negative-caption triples, zero-shot classification."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from retrieval.data.pairs import iter_pairs
from retrieval.data.synth import SynthConfig, generate
from retrieval.errors import UserError
from retrieval.eval.binding import BindingConfig, evaluate_binding, load_triples
from retrieval.eval.evaluate import EvalConfig, evaluate
from retrieval.eval.zeroshot import (
    ZeroShotConfig,
    class_embeddings,
    evaluate_zero_shot,
    load_templates,
    scan_classes,
    topk_accuracy,
)
from retrieval.models.albef import AlbefModel
from retrieval.models.encoders import create_clip
from retrieval.models.fusion import FusionConfig

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def _image(path, colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(path)
    return path


def test_triples_in_every_layout_and_spelling(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "imgs" / "b.png")
    rows = [
        {"image": "a.png", "pos": "a red dog", "neg": "a dog red", "type": "swap"},
        {"image": "imgs/b.png", "pos": "x", "neg": "   "},  # empty negative: skipped
        {"image": "gone.png", "pos": "x", "neg": "y"},  # missing file: skipped
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    triples, skipped = load_triples(tmp_path / "t.jsonl")
    assert skipped == 2 and len(triples) == 1
    assert triples[0].image == str(tmp_path / "a.png") and triples[0].negatives == ["a dog red"]
    assert triples[0].kind == "swap"
    # SugarCrepe: one JSON object keyed by id, file names relative to an image folder given apart
    sugar = {"0": {"filename": "b.png", "caption": "c", "negative_caption": "n"}}
    (tmp_path / "swap_att.json").write_text(json.dumps(sugar))
    triples, _ = load_triples(tmp_path / "swap_att.json", images_root=str(tmp_path / "imgs"))
    assert [(t.caption, t.negatives) for t in triples] == [("c", ["n"])]
    # ARO's spelling, as CSV
    (tmp_path / "aro.csv").write_text("image_path,true_caption,false_caption\na.png,t,f\n")
    assert load_triples(tmp_path / "aro.csv")[0][0].negatives == ["f"]
    # parquet with a list of negatives per row
    table = pa.table({"image": ["a.png"], "caption": ["t"], "negatives": [["f1", "f2"]]})
    pq.write_table(table, tmp_path / "t.parquet")
    assert load_triples(tmp_path / "t.parquet")[0][0].negatives == ["f1", "f2"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("t.jsonl", '{"image": "a.png", "caption": "c"}\n', "negative | neg | negative_caption"),
        ("t.txt", "x", "unknown triples format"),
        ("t.json", "{not json", "cannot read triples"),
        ("t.jsonl", '{"image": "gone.png", "caption": "c", "negative": "n"}\n', "no usable triples"),
    ],
)
def test_bad_triples_files_are_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=message) as e:
        load_triples(tmp_path / name)
    assert "\n" not in str(e.value)


def test_binding_from_a_triples_file_equals_the_synth_binding(tmp_path):
    """`data synth` writes its held-out scenes' hard negatives as triples; scored from that file they give what
    the synth rows give, key for key (same negatives, same scorers)."""
    generate(tmp_path, SynthConfig(n=40, image_size=32, workers=1), progress=False)
    clip, _ = create_clip("test-micro", "none", seed=0)
    model = AlbefModel(clip, FusionConfig(width=32, layers=1, heads=2))
    inputs = {
        "image_size": 32,
        "mean": clip.visual.preprocess_cfg["mean"],
        "std": clip.visual.preprocess_cfg["std"],
        "tokenizer": __import__("open_clip").get_tokenizer("test-micro"),
        "device": torch.device("cpu"),
    }
    pairs = list(iter_pairs(tmp_path / "heldout.jsonl"))
    synth = evaluate(model, pairs, EvalConfig(), **inputs)
    triples, skipped = load_triples(tmp_path / "heldout_binding.jsonl")
    found = evaluate_binding(model, triples, BindingConfig(), **inputs)
    assert skipped == 0 and found["binding.n_triples"] == len(triples) > len(pairs)
    binding = {k: v for k, v in synth.items() if k.startswith("binding")}
    assert {"binding", "binding.itc", "binding.rerank", "binding.itc.relation"} <= binding.keys()
    assert binding == {k: v for k, v in found.items() if k in binding}


def test_topk_accuracy_counts_ties_against_and_clips_k():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.5, 0.4], [0.3, 0.3, 0.3]])
    labels = torch.tensor([0, 2, 1])
    got = topk_accuracy(scores, labels, ks=(1, 2, 5))
    # row 0 right; row 1 second; row 2 tied with everything: rank 2 of 3
    assert got == {"acc@1": 1 / 3, "acc@2": 2 / 3, "acc@5": 1.0}


def test_class_embeddings_average_the_prompts_of_each_class():
    prompts = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0], [1.0, 0]]), dim=-1)
    classes = class_embeddings(prompts, 2)  # class 0: two prompts at right angles, class 1: both along x
    torch.testing.assert_close(classes, torch.tensor([[2**-0.5, 2**-0.5], [1.0, 0.0]]))


def test_templates_named_or_from_a_file_never_formatted(tmp_path):
    assert len(load_templates("openai")) == 80 and load_templates("plain")[0]("dog") == "dog"
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n\n{c} {0} {c.__class__}\n")
    made = [t("dog") for t in load_templates(str(tmp_path / "t.txt"))]
    assert made == ["a photo of a dog.", "dog {0} {c.__class__}"]
    (tmp_path / "bad.txt").write_text("a photo\n")
    with pytest.raises(UserError, match="with {c}"):
        load_templates(str(tmp_path / "bad.txt"))
    with pytest.raises(UserError, match="not one of openai"):
        load_templates("imagenet")


def test_scan_classes_reads_folder_names_and_refuses_one_class(tmp_path):
    _image(tmp_path / "golden_retriever" / "a.png")
    _image(tmp_path / "golden_retriever" / "deep" / "b.jpg")
    _image(tmp_path / "tabby_cat" / "c.png")
    (tmp_path / "empty").mkdir()
    names, images = scan_classes(tmp_path)
    assert names == ["golden retriever", "tabby cat"]
    assert [p.extra["label"] for p in images] == [0, 0, 1]
    with pytest.raises(UserError, match="at least 2"):
        scan_classes(tmp_path / "golden_retriever")


class _ColourClip(nn.Module):
    """An oracle dual encoder: an image is its dominant colour channel, a prompt the colour it names."""

    def __init__(self, swap: bool = False) -> None:
        super().__init__()
        self.visual = nn.Module()
        self.swap = swap
        self.w = nn.Parameter(torch.zeros(1))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        channel = x.mean(dim=(2, 3)).argmax(dim=1)  # (B,)
        if self.swap:
            channel = (channel + 1) % 3
        return nn.functional.one_hot(channel, 3).float()  # (B, 3)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(ids[:, 0], 3).float()  # (B, 3)


def _colour_tokens(prompts: list[str]) -> torch.Tensor:
    names = list(COLOURS)
    return torch.tensor([[next(i for i, c in enumerate(names) if c in p)] for p in prompts])  # (B, 1)


def test_zero_shot_accuracy_of_an_oracle_and_of_a_wrong_one(tmp_path):
    for name, colour in COLOURS.items():
        for i in range(2):
            _image(tmp_path / name / f"{i}.png", colour)
    (tmp_path / "red" / "broken.jpg").write_bytes(b"not an image")
    inputs = {"image_size": 16, "mean": (0, 0, 0), "std": (1, 1, 1), "tokenizer": _colour_tokens}
    cfg = ZeroShotConfig(templates="simple", ks=(1, 2))
    right = evaluate_zero_shot(_ColourClip(), tmp_path, cfg, device=torch.device("cpu"), **inputs)
    assert right == {
        "zeroshot.acc@1": 1.0,
        "zeroshot.acc@2": 1.0,
        "zeroshot.n_images": 6,
        "zeroshot.n_classes": 3,
        "zeroshot.skipped_images": 1,
    }
    wrong = evaluate_zero_shot(_ColourClip(swap=True), tmp_path, cfg, device=torch.device("cpu"), **inputs)
    assert wrong["zeroshot.acc@1"] == 0.0 and wrong["zeroshot.acc@2"] == 0.0  # ties count against

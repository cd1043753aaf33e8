"""Training on real-shaped data: several captions per image, fine-tuning from a trained start, frozen towers,
photo-safe refinement terms, streamed shards."""

import io
import json
import tarfile

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from retrieval.data.grouping import group_pairs, image_key
from retrieval.data.pairs import Pair
from retrieval.data.synth import SynthConfig, generate
from retrieval.errors import UserError
from retrieval.train.config import RefineConfig, load_train_config
from retrieval.train.data import BatchPlan, TrainData
from retrieval.train.loop import train
from retrieval.train.optim import param_groups
from retrieval.train.refine import relation_terms
from retrieval.train.twins import opposite_caption

TINY = [
    "model.arch=test-micro",
    "model.fusion.width=32",
    "model.fusion.layers=1",
    "model.fusion.heads=2",
    "batch_size=8",
    "log_every=1",
    "save_every=2",
    "optim.warmup_steps=2",
    "refine.batch_size=8",
    "refine.steps=2",
]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """Scenes with five differently worded captions per image (COCO-style rows)."""
    out = tmp_path_factory.mktemp("coco")
    generate(out, SynthConfig(n=40, image_size=48, captions=5, wording="varied"), progress=False)
    return out


def test_pairs_group_by_image_id_then_path_and_equal_captions_share_an_id():
    pairs = [
        Pair("a.jpg", "a.jpg", "A dog", {}),
        Pair("b.jpg", "b.jpg", "a cat", {"image_id": 7}),
        Pair("a.jpg", "a.jpg", "a brown dog", {}),
        Pair("c.jpg", "c.jpg", "another cat", {"image_id": 7}),  # same image_id: the same image as b.jpg
        Pair("d.jpg", "d.jpg", "a  dog", {}),  # the same caption as a.jpg's first (case, spacing)
    ]
    groups = group_pairs(pairs)
    assert [image_key(p) for p in groups.images] == ["a.jpg", "id:7", "d.jpg"]
    assert (
        groups.captions_of(0) == [0, 2] and groups.captions_of(1) == [1, 3] and groups.captions_of(2) == [4]
    )
    assert groups.counts().tolist() == [2, 2, 1]
    # "A dog" describes a.jpg and d.jpg: the same caption id, so drawn together they are positives
    assert groups.caption_ids[0] == groups.caption_ids[4] != groups.caption_ids[1]


def test_batch_positives_join_rows_of_one_image_or_one_caption():
    from retrieval.data.grouping import batch_positive_ids

    ids = batch_positive_ids(
        ["a", "b", "a", None, "c", "d"],
        ["a dog", "A  Dog", "a brown dog", "a brown dog", "a cat", "a bird"],
    ).tolist()
    # rows 0 and 2 show one image, row 1 repeats row 0's caption, row 3 (a recoloured copy) repeats row 2's
    assert ids[0] == ids[1] == ids[2] == ids[3]
    assert len({ids[0], ids[4], ids[5]}) == 3
    # the id is the group's caption's, so another batch (another rank, a queue) agrees on equal texts
    assert batch_positive_ids([None], ["a cat"]).tolist() == [ids[4]]


def test_batches_hold_distinct_images_each_with_one_of_its_own_captions(coco):
    from retrieval.train.data import load_groups

    groups = load_groups(coco / "train.jsonl")
    assert len(groups.captions) == 5 * len(groups)

    class Images:  # one decoded copy per image, not per caption
        cache = torch.arange(len(groups)).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).to(torch.uint8)
        valid = torch.ones(len(groups), dtype=torch.bool)

    plan = BatchPlan(Images.valid, batch_size=8, seed=0)
    tokenizer = open_clip.get_tokenizer("test-micro")
    data = TrainData(groups, Images, tokenizer, plan, text_negatives=True)
    seen = set()
    for m in range(40):
        batch = data.batch(m)
        images = batch.pixels[:, 0, 0, 0].long()  # the image index each row carries
        assert len(set(images.tolist())) == len(images)  # no image twice in a batch
        same_id = batch.ids[:, None] == batch.ids[None]  # (B, B)
        same_text = (batch.tokens[:, None] == batch.tokens[None]).all(-1)  # (B, B)
        assert torch.equal(same_id, same_text)  # positives: rows whose drawn captions are the same text
        for row, image in enumerate(images.tolist()):
            own = {tuple(tokenizer([groups.captions[c]])[0].tolist()) for c in groups.captions_of(image)}
            assert tuple(batch.tokens[row].tolist()) in own  # the row's caption is one of its image's
            seen.add(tuple(batch.tokens[row].tolist()))
    assert len(seen) > 2 * len(groups)  # over the epochs, images show several of their captions
    assert torch.equal(data.batch(3).tokens, data.batch(3).tokens)  # a resumed run draws the same captions


def test_fine_tuning_keeps_the_start_and_step_0_evaluates_it(coco, tmp_path):
    from retrieval.eval.evaluate import EvalConfig, evaluate
    from retrieval.models.albef import load_albef

    data, heldout = str(coco / "train.jsonl"), str(coco / "heldout.jsonl")
    train(data, tmp_path / "start", load_train_config(None, [*TINY, "steps=4"]), progress=False)
    start, arch = load_albef(tmp_path / "start")

    cfg = load_train_config(
        None, [*TINY, "steps=2", f"model.init_checkpoint={tmp_path / 'start'}", f"eval_pairs={heldout}"]
    )
    assert cfg.optim.preset == "finetune" and cfg.optim.lr == 5e-5 and cfg.refine.reset_fusion is False
    assert (
        load_train_config(None, [*TINY, "optim.preset=finetune", "optim.lr=1e-4"]).optim.lr == 1e-4
    )  # set wins
    train(data, tmp_path / "ft", cfg, progress=False)
    log = [json.loads(x) for x in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0
    from retrieval.data.pairs import iter_pairs

    size = start.clip.visual.image_size
    own = evaluate(
        start,
        list(iter_pairs(heldout)),
        EvalConfig(limit=cfg.eval_limit, binding=False),
        image_size=int(size[0] if isinstance(size, (tuple, list)) else size),
        mean=start.clip.visual.preprocess_cfg["mean"],
        std=start.clip.visual.preprocess_cfg["std"],
        tokenizer=open_clip.get_tokenizer(arch),
        device=torch.device("cpu"),
    )
    for key in ("t2i.R@1", "t2i.R@5", "i2t.R@1"):
        assert log[0][f"eval.{key}"] == own[key], key
    # WiSE-FT (the preset's optim.wise=0.5): the checkpoint is the midpoint of the start and the fine-tuned
    # weights, which the resume state keeps as they are
    raw = load_file(str(tmp_path / "ft" / "resume" / "task.safetensors"))
    begin = load_file(str(tmp_path / "start" / "dual_encoder.safetensors"))
    final = load_file(str(tmp_path / "ft" / "dual_encoder.safetensors"))
    moved = [k for k in final if not torch.equal(raw[f"model.clip.{k}"], begin[k])]
    assert moved
    for k in moved:
        torch.testing.assert_close(final[k], (begin[k] + raw[f"model.clip.{k}"]) / 2, rtol=1e-5, atol=1e-6)
    assert log[-1]["stage"] == "wise" and log[-1]["wise"] == 0.5
    tuned, _ = load_albef(tmp_path / "ft")
    assert float(tuned.logit_scale.detach()) == pytest.approx(
        float(start.logit_scale.detach()), rel=0.05
    )  # not reset to 1/0.07


def test_a_locked_image_tower_lit_does_not_move(coco, tmp_path):
    data = str(coco / "train.jsonl")
    train(data, tmp_path / "a", load_train_config(None, [*TINY, "steps=2", "refine.steps=1"]), progress=False)
    cfg = load_train_config(
        None,
        [*TINY, "steps=3", f"model.init_checkpoint={tmp_path / 'a'}", "model.freeze=image", "optim.lr=1e-2"],
    )
    train(data, tmp_path / "lit", cfg, progress=False)
    before = load_file(str(tmp_path / "a" / "dual_encoder.safetensors"))
    after = load_file(str(tmp_path / "lit" / "dual_encoder.safetensors"))
    visual = [k for k in before if k.startswith("visual.")]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("transformer."))
    with pytest.raises(UserError, match="model.freeze"):
        load_train_config(None, ["model.freeze=legs"])


def test_layer_decay_gives_lower_blocks_lower_rates():
    from retrieval.models.encoders import create_untrained

    model = create_untrained("tiny-vit-64")  # 4 vision blocks
    groups = param_groups(model, 0.05, lr=1e-3, layer_decay=0.5)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    blocks = sorted({int(n.split(".")[3]) for n in named if n.startswith("visual.transformer.resblocks.")})
    first = rate[id(named[f"visual.transformer.resblocks.{blocks[0]}.mlp.c_fc.weight"])]
    last = rate[id(named[f"visual.transformer.resblocks.{blocks[-1]}.mlp.c_fc.weight"])]
    assert first < last < 1e-3 + 1e-12
    assert rate[id(named["logit_scale"])] == 1e-3  # past the blocks: the full rate


def test_relation_terms_turn_on_for_scene_grammar_and_stay_off_for_photo_captions():
    scenes = [
        "a red circle left of a blue square",
        "one large cross is above a small circle",
        "a green cross",
    ]
    photos = [
        "a man raising his right hand",
        "a house on top of the hill",
        "two dogs playing in the snow",
        "a woman holding an umbrella",
    ]
    on, vertical, why = relation_terms(scenes, RefineConfig())
    assert on and vertical and "auto" in why
    on, vertical, why = relation_terms(photos, RefineConfig())
    assert not on and not vertical and "25%" in why
    assert relation_terms(photos, RefineConfig(relation_terms="on"))[0]
    # a wording the relation lexicon cannot read still turns them on through its left/right words
    listed = ["left: a red circle; right: a blue square", "a green cross with a red circle at its right"]
    on, _, why = relation_terms(listed + photos[2:], RefineConfig())
    assert on and "50% name left or right" in why


def test_opposite_caption_reverses_a_relation_in_any_wording():
    assert (
        opposite_caption("a red circle left of a blue square", False) == "a red circle right of a blue square"
    )
    assert (
        opposite_caption("left: red circle; right: blue cross", False)
        == "right: red circle; left: blue cross"
    )
    assert (
        opposite_caption("a cross with a circle at its Left", False) == "a cross with a circle at its Right"
    )
    assert opposite_caption("a circle higher than a square", True) == "a circle lower than a square"
    assert opposite_caption("a circle nearer than a square", True) is None  # no word it knows
    assert opposite_caption("a small red circle", True) is None


def _shards(coco, out, n_shards, image_ids=False, caption=None):
    """The train split as WebDataset shards: one sample per (image, caption) row, dealt round-robin (an image's
    captions land in several shards); with image_ids, each sample's .json names its image; caption(row) -> the
    caption written instead of the row's own."""
    rows = [json.loads(line) for line in (coco / "train.jsonl").read_text().splitlines()]
    if caption is not None:
        rows = [{**row, "caption": caption(row)} for row in rows]
    out.mkdir()
    for s in range(n_shards):
        with tarfile.open(out / f"shard-{s:02d}.tar", "w") as tar:
            for k, row in enumerate(rows[s::n_shards]):
                members = {"jpg": (coco / row["image"]).read_bytes(), "txt": row["caption"].encode()}
                if image_ids:
                    members["json"] = json.dumps({"image_id": row["image"]}).encode()
                if k == 3 and s == 0:
                    members["jpg"] = b"not an image"  # skipped; the batch is still full
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{s:02d}{k:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return out


def test_streamed_refinement_set_holds_max_pairs_images_with_all_their_captions(coco, tmp_path):
    from retrieval.train.stream import StreamData

    shards = _shards(coco, tmp_path / "shards", 4, image_ids=True)
    cfg = load_train_config(None, [*TINY, "refine.max_pairs=6", "workers=1"])
    data = StreamData(str(shards), cfg, open_clip.get_tokenizer("test-micro"), 32).refine_set()
    # six images, not six captions: the captions dealt to other shards are read too
    assert len(data.groups) == 6 and len(data.captions) > 6


def test_streamed_rows_of_other_images_with_one_caption_are_positives(coco, tmp_path):
    """Four captions shared among the images: within a streamed batch, rows share a positive id exactly when
    they carry the same caption, and some rows of distinct images do (the check is not vacuous)."""
    from retrieval.train.stream import StreamData

    def caption(row):
        return f"scene number {sum(row['image'].encode()) % 4}"

    shards = _shards(coco, tmp_path / "shards", 4, caption=caption)
    cfg = load_train_config(None, [*TINY, "workers=1", "shuffle_buffer=16", "recolour=off"])
    batches = StreamData(str(shards), cfg, open_clip.get_tokenizer("test-micro"), 32).batches(0)
    across = 0
    for _ in range(4):
        b = next(batches)
        same_text = (b.tokens[:, None] == b.tokens[None]).all(-1)  # (B, B)
        same_image = (b.pixels[:, None] == b.pixels[None]).flatten(2).all(-1)  # (B, B)
        assert torch.equal(same_text, b.ids[:, None] == b.ids[None])
        across += int((same_text & ~same_image).sum())
    assert across > 0


def test_streamed_shards_give_full_batches_and_resume_exactly(coco, tmp_path):
    from retrieval.train.stream import StreamData

    shards = _shards(coco, tmp_path / "shards", 4)
    # recoloured rows too: their draws are seeded by the reader's position, so a resume redraws them
    cfg = load_train_config(None, [*TINY, "steps=4", "workers=2", "shuffle_buffer=16", "recolour=on"])
    stream = StreamData(str(shards), cfg, open_clip.get_tokenizer("test-micro"), 32)
    assert stream.recolour[0] == 0.5 and "recolour on" in stream.describe()
    batches = stream.batches(0)
    first = [next(batches) for _ in range(5)]
    assert all(b.pixels.shape == (8, 3, 32, 32) and b.tokens.shape[0] == 8 for b in first)
    assert all(b.negative_tokens is not None for b in first)
    for b in first:  # rows with the same caption are positives (recoloured or not, whichever image)
        same_text = (b.tokens[:, None] == b.tokens[None]).all(-1)  # (B, B)
        assert not (same_text & (b.ids[:, None] != b.ids[None])).any()
    # a resumed reader (its state after 3 batches) yields the 4th and 5th batches again
    resumed = StreamData(str(shards), cfg, open_clip.get_tokenizer("test-micro"), 32)
    again = StreamData(str(shards), cfg, open_clip.get_tokenizer("test-micro"), 32)
    it = again.batches(0)
    for _ in range(3):
        next(it)
    resumed.restore(again.state())
    it = resumed.batches(3)
    for want in first[3:]:
        got = next(it)
        assert torch.equal(got.pixels, want.pixels) and torch.equal(got.tokens, want.tokens)

    # train on the shards end to end, stopped and resumed: the same weights as a straight run
    train(str(shards), tmp_path / "straight", cfg, progress=False)
    train(str(shards), tmp_path / "split", cfg, progress=False, stop_after=2)
    train(str(shards), tmp_path / "split", cfg, progress=False, resume=True)
    a = load_file(str(tmp_path / "straight" / "dual_encoder.safetensors"))
    b = load_file(str(tmp_path / "split" / "dual_encoder.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert (tmp_path / "straight" / "fusion.safetensors").exists()  # the stage ran on the stream's head


def test_same_image_in_several_stream_samples_shares_one_id(coco, tmp_path):
    from retrieval.train.stream import image_id

    row = json.loads((coco / "train.jsonl").read_text().splitlines()[0])
    data = (coco / row["image"]).read_bytes()
    assert image_id(data) == image_id(bytes(data)) != image_id(b"other")
    assert image_id(str(coco / row["image"])) == image_id(str(coco / row["image"]))


def test_progress_without_a_terminal_prints_short_lines(capsys, monkeypatch):
    from retrieval import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    bar = progress.progress_bar(desc="decoding", unit="img", total=3)
    for _ in range(3):
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and all(line.startswith("decoding: ") and "\r" not in line for line in lines)
    assert lines[-1].startswith("decoding: 3/3 img")


def test_an_empty_image_id_falls_back_to_the_path(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert image_key(Pair(str(tmp_path / "x.png"), str(tmp_path / "x.png"), "c", {"img_id": ""})) == str(
        tmp_path / "x.png"
    )


def test_batches_decoded_from_disk_replace_broken_images_and_keep_their_shape(tmp_path):
    from retrieval.train.data import PairImages

    pairs = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        if i % 3 == 0:
            path.write_bytes(b"broken")
        else:
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(path)
        pairs.append(Pair(str(path), str(path), f"caption {i}", {}))
    groups = group_pairs(pairs)
    images = PairImages(groups.images, 8, cache=False, max_cache_gb=1.0, progress=False)
    plan = BatchPlan(images.valid, batch_size=6, seed=0)
    data = TrainData(groups, images, open_clip.get_tokenizer("test-micro"), plan)
    for m in range(4):
        batch = data.batch(m)
        assert batch.pixels.shape == (6, 3, 8, 8) and batch.tokens.shape[0] == batch.ids.shape[0] == 6
        assert torch.equal(batch.pixels, data.batch(m).pixels)  # the same replacements on a resume

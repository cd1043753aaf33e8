"""`retrieval eval` beyond held-out pairs: --binding triples (as `data synth` writes them) and --zero-shot folders."""

import json
import os

import pytest

from tests.cli.conftest import TINY, invoke, sets


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    scenes, ck = tiny_run
    root = tmp_path_factory.mktemp("eval-suite")
    # a folder per class: the one-object scenes by their shape
    classes = root / "classes"
    for line in (scenes / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        if len(row["objects"]) == 1:
            folder = classes / row["objects"][0]["shape"]
            folder.mkdir(parents=True, exist_ok=True)
            os.symlink(scenes / row["image"], folder / os.path.basename(row["image"]))
    return scenes, ck, classes


def test_binding_triples_and_zero_shot_from_the_command_line(runner, trained):
    scenes, ck, classes = trained

    def run_cli(*args):  # in process: one import of torch for every command of the test
        return invoke(runner, *args)

    synth = run_cli("eval", scenes / "heldout.jsonl", "--checkpoint", ck, "--json")
    assert synth.exit_code == 0, synth.output
    triples = run_cli("eval", "--binding", scenes / "heldout_binding.jsonl", "--checkpoint", ck, "--json")
    assert triples.exit_code == 0, triples.output
    by_rows, by_file = json.loads(synth.stdout), json.loads(triples.stdout)
    # the triples `data synth` writes score exactly as the held-out rows' own hard negatives
    assert {k: v for k, v in by_rows.items() if k.startswith("binding")} == {
        k: v for k, v in by_file.items() if k in by_rows
    }
    assert by_file["binding.n_triples"] > 0 and by_file["binding.skipped_triples"] == 0
    both = run_cli(
        "eval",
        scenes / "heldout.jsonl",
        "--checkpoint",
        ck,
        "--binding",
        scenes / "heldout_binding.jsonl",
        "--zero-shot",
        classes,
        "--templates",
        "plain",
        "--json",
    )
    assert both.exit_code == 0, both.output
    report = json.loads(both.stdout)
    assert report["t2i.R@1"] == by_rows["t2i.R@1"] and report["binding.itc"] == by_file["binding.itc"]
    assert report["zeroshot.n_classes"] == 4 and report["zeroshot.n_images"] > 0
    assert 0.0 <= report["zeroshot.acc@1"] <= report["zeroshot.acc@5"] == 1.0  # 4 classes: top 5 holds all


def test_bad_eval_input_is_one_line_exit_2(runner, trained, tmp_path):
    scenes, ck, classes = trained
    (tmp_path / "one" / "only").mkdir(parents=True)
    for args, message in (
        (["eval", "--checkpoint", ck], "nothing to evaluate"),
        (["eval", "--binding", scenes / "train.jsonl", "--checkpoint", ck], "negative | neg"),
        (["eval", "--zero-shot", tmp_path / "one", "--checkpoint", ck], "at least 2"),
        (["eval", "--zero-shot", classes, "--templates", "nope", "--checkpoint", ck], "not one of openai"),
        (["eval", "--zero-shot", classes], "needs --checkpoint"),
    ):
        result = invoke(runner, *args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr and result.stdout == ""


def test_a_checkpoint_without_an_itm_head_gets_its_itc_recall(runner, tiny_run, tmp_path):
    scenes, _ = tiny_run
    ck = tmp_path / "itc"
    trained = invoke(runner, "train", scenes / "train.jsonl", "--out", ck, "-q",
                     *sets(*TINY, "steps=2", "objectives.itm=false", "refine.steps=0"))  # fmt: skip
    assert trained.exit_code == 0, trained.output
    result = invoke(runner, "eval", scenes / "heldout.jsonl", "--checkpoint", ck, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert 0 <= report["t2i.R@1"] <= report["t2i.R@5"] <= 1
    assert not any(k.startswith(("rerank", "binding")) for k in report)  # those need the head it lacks
    refused = invoke(runner, "eval", scenes / "heldout.jsonl", "--checkpoint", ck, "--rerank", "4")
    assert refused.exit_code == 2 and "no ITM head" in refused.stderr

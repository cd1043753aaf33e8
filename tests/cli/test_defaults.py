"""Defaults that can't mislead: a real pretrained model unless random weights are asked for by name."""

import json

from indexes.manifest import read_manifest
from tests.cli.conftest import invoke, make_images

TINY = ["--model", "test-micro", "--device", "cpu"]


def test_offline_default_fails_at_once_and_writes_nothing(runner, tmp_path):
    # conftest sets HF_HUB_OFFLINE=1: the default ViT-B-32/LAION weights cannot be fetched
    folder, db = tmp_path / "photos", tmp_path / "new"
    make_images(folder, 3)
    result = invoke(runner, "index", folder, "--db", db, "-q")
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1
    for way_out in ("--pretrained FILE", "--checkpoint DIR", "--pretrained none", "laion2b_s34b_b79k"):
        assert way_out in result.stderr
    assert not db.exists()


def test_random_weights_only_by_name_and_said_plainly(runner, tmp_path):
    folder, db = tmp_path / "photos", tmp_path / "db"
    make_images(folder, 4)
    no_weights = invoke(runner, "index", folder, "--db", db, *TINY, "-q")
    assert no_weights.exit_code == 2 and "--pretrained none" in no_weights.stderr and not db.exists()

    made = invoke(runner, "index", folder, "--db", db, *TINY, "--pretrained", "none", "-q")
    assert made.exit_code == 0, made.output
    assert "RANDOM weights" in made.stderr

    # no model flags on an existing collection: its own model, not the download default
    make_images(folder, 2, start=10)
    again = invoke(runner, "index", folder, "--db", db, "--json", "-q")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["new"] == 2
    assert read_manifest(db)["model"]["arch"] == "test-micro"


def test_search_pretrained_without_model_is_an_error(runner, tmp_path):
    folder, db = tmp_path / "photos", tmp_path / "db"
    make_images(folder, 3)
    assert invoke(runner, "index", folder, "--db", db, *TINY, "--pretrained", "none", "-q").exit_code == 0
    result = invoke(runner, "search", "x", "--db", db, "--pretrained", "laion2b_s34b_b79k")
    assert result.exit_code == 2 and "--model" in result.stderr and result.stderr.count("\n") == 1

import json
import os
import subprocess
import sys
import time

from indexes.manifest import read_manifest
from indexes.store import ImageStore
from tests.cli.conftest import BROKEN, add_broken, invoke, make_images, run_cli

MODEL = ["--model", "test-micro", "--pretrained", "none", "--device", "cpu"]


def index_json(runner, folder, db, *extra):
    result = invoke(runner, "index", folder, "--db", db, *MODEL, "--json", "-q", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_index_is_incremental_and_names_broken_files(runner, tmp_path):
    folder, db = tmp_path / "photos", tmp_path / "db"
    good = make_images(folder, 40)
    add_broken(folder)
    first = index_json(runner, folder, db, "--batch-size", "8", "--commit-every", "16")
    assert first["new"] == 40 and first["total"] == 40
    assert {os.path.basename(p) for p in first["skipped"]} == BROKEN
    paths = sorted(ImageStore(db).stats())
    assert paths == sorted(str(p) for p in good)

    second = index_json(runner, folder, db)
    assert (second["new"], second["changed"], second["touched"], second["unchanged"]) == (0, 0, 0, 40)

    # one file rewritten, one only touched, one deleted, two added
    make_images(folder, 1, seed=99, start=0)  # overwrites img_0000.png with other pixels
    os.utime(good[1], ns=(time.time_ns(), time.time_ns() + 10**9))
    good[2].unlink()
    make_images(folder, 2, seed=5, start=100)
    third = index_json(runner, folder, db)
    assert (third["new"], third["changed"], third["touched"], third["removed"]) == (2, 1, 1, 1)
    assert third["total"] == 41 == ImageStore(db).count()


def test_search_json_table_image_and_html(runner, tmp_path):
    folder, db = tmp_path / "photos", tmp_path / "db"
    paths = make_images(folder, 12)
    index_json(runner, folder, db)
    result = invoke(runner, "search", "a red square + 2:blue - night", "--db", db, "-k", "5", "--json")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 5 and all(os.path.exists(h["path"]) for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    by_image = json.loads(
        invoke(runner, "search", "--image", paths[3], "--db", db, "-k", "3", "--json").stdout
    )
    assert by_image[0]["path"] == str(paths[3]) and by_image[0]["score"] > 0.999

    sheet = tmp_path / "sheet.html"
    table = invoke(runner, "search", "dog", "--db", db, "-k", "4", "--html", sheet)
    assert table.exit_code == 0 and "score" in table.stdout
    html = sheet.read_text()
    assert html.count("data:image/jpeg;base64,") == 4 and "file://" not in html


def test_another_model_is_refused_and_changes_nothing(runner, tmp_path):
    folder, db = tmp_path / "photos", tmp_path / "db"
    make_images(folder, 6)
    index_json(runner, folder, db)
    manifest = json.dumps(read_manifest(db), sort_keys=True)
    version = ImageStore(db).version
    make_images(folder, 2, start=50)  # new files that must not be embedded with the other model

    result = invoke(runner, "index", folder, "--db", db, *MODEL, "--seed", "1", "-q")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "--reembed" in result.stderr
    assert json.dumps(read_manifest(db), sort_keys=True) == manifest and ImageStore(db).version == version

    result = invoke(runner, "search", "x", "--db", db, "--model", "tiny-vit-64")
    assert result.exit_code == 2 and "was built with" in result.stderr

    redone = index_json(runner, folder, db, "--seed", "1", "--reembed")
    assert redone["new"] == 8 and read_manifest(db)["model"]["weights"] == "random-init:seed=1"


def test_bad_input_is_one_line_exit_2(runner, tmp_path):
    for args in (
        ["index", tmp_path / "missing", "--db", tmp_path / "db", *MODEL],
        ["search", "x", "--db", tmp_path / "nothing"],
        ["index", tmp_path, "--db", tmp_path / "db", "--model", "ViT-B-99"],
    ):
        result = invoke(runner, *args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_cold_cli_index_and_search(tmp_path):
    """A fresh process per command, as a user's shell runs them. The index run caches the model's text tower in
    numpy; a text search then answers without importing torch, with the hits the torch path gives."""
    folder, db = tmp_path / "photos", tmp_path / "db"
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    make_images(folder, 10)
    assert run_cli("index", folder, "--db", db, *MODEL, "-q", env={**os.environ, **env}).returncode == 0
    assert list((tmp_path / "cache" / "retrieval" / "text-towers").glob("*/tower.json"))
    code = (
        "import json, sys; from cli.main import app\n"
        "try:\n    app(sys.argv[1:])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print(json.dumps(sorted(m for m in ('torch', 'open_clip', 'lancedb') if m in sys.modules)), file=sys.stderr)"
    )
    args = ["search", "a red square + blue", "--db", str(db), "-k", "3", "--json"]
    quick = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env={**os.environ, **env}
    )
    assert quick.returncode == 0, quick.stderr
    assert json.loads(quick.stderr.strip().splitlines()[-1]) == ["lancedb"]  # no torch, no open_clip
    # the torch path: the model named in full
    full = run_cli(*args, *MODEL)
    assert full.returncode == 0, full.stderr
    fast, slow = json.loads(quick.stdout), json.loads(full.stdout)
    assert [h["path"] for h in fast] == [h["path"] for h in slow] and len(fast) == 3
    assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(fast, slow, strict=True))

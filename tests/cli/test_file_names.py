"""Any file name: indexed, found by search, shown literally in the table, --json and the HTML sheet."""

import json
import os

from PIL import Image

from tests.cli.conftest import invoke

MODEL = ["--model", "test-micro", "--pretrained", "none", "--device", "cpu"]
NAMES = [b"bad\xff\xfename.png", b"x[bold]y[red]z.png", b"tab\there.png", b"new\nline.png"]


def test_odd_names_are_indexed_found_and_shown_exactly(runner, tmp_path):
    folder, db = tmp_path / "photos", tmp_path / "db"
    folder.mkdir()
    for i, name in enumerate(NAMES):
        Image.new("RGB", (40, 30), (60 * i, 90, 200 - 40 * i)).save(os.path.join(os.fsencode(folder), name))
    done = invoke(runner, "index", folder, "--db", db, *MODEL, "--json", "-q")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["new"] == len(NAMES)
    again = invoke(
        runner, "index", folder, "--db", db, *MODEL, "--json", "-q"
    )  # a re-run sees every name again
    assert json.loads(again.stdout)["unchanged"] == len(NAMES)

    on_disk = {os.path.join(os.fsencode(folder), n) for n in NAMES}
    found = invoke(runner, "search", "anything", "--db", db, "-k", "10", "--json")
    assert found.exit_code == 0, found.output
    assert {os.fsencode(h["path"]) for h in json.loads(found.stdout)} == on_disk  # exact bytes back

    sheet = tmp_path / "sheet.html"
    table = invoke(runner, "search", "anything", "--db", db, "-k", "10", "--html", sheet)
    assert table.exit_code == 0, table.output
    html = sheet.read_text()
    for shown in ("bad\\xff\\xfename.png", "x[bold]y[red]z.png", "tab\\there.png", "new\\nline.png"):
        assert shown in table.stdout.replace("\n", "") or shown in table.stdout
        assert shown in html

import base64
import json
import os

import numpy as np

from indexes.paths import display, from_stored, json_dumps, json_fields, to_stored
from indexes.store import ImageStore, path_id

ODD = [
    os.fsdecode(b"/p/bad\xff\xfename.png"),
    "/p/x[bold]y[red]z.png",
    "/p/tab\there.png",
    "/p/new\nline.png",
    "/p/caf\u00e9 \U0001f436.png",
]


def test_stored_form_is_valid_utf8_and_round_trips():
    for path in ODD:
        stored, meta = to_stored(path, json.dumps({"k": 1}))
        stored.encode("utf-8")  # LanceDB needs valid UTF-8
        assert from_stored(stored, meta) == path
        assert json.loads(meta)["k"] == 1  # what the source gave is kept


def test_json_form_round_trips_through_text_for_python_and_for_other_readers():
    for path in ODD:
        text = json_dumps(json_fields(path))
        text.encode("ascii")
        back = json.loads(text)
        assert os.fsencode(back["path"]) == os.fsencode(path)
        if "path_bytes" in back:
            assert base64.b64decode(back["path_bytes"]) == os.fsencode(path)
    assert "path_bytes" not in json_fields("/p/plain.png")


def test_display_is_one_literal_line():
    assert display(ODD[0]) == "/p/bad\\xff\\xfename.png"
    assert display(ODD[1]) == ODD[1]  # markup characters shown as they are
    assert display(ODD[2]) == "/p/tab\\there.png"
    assert display(ODD[3]) == "/p/new\\nline.png"
    assert display(ODD[4]) == ODD[4]
    assert all("\n" not in display(p) and display(p).isprintable() for p in ODD)


def test_store_keeps_any_name(tmp_path):
    store = ImageStore(tmp_path, dim=4)
    rows = [
        {
            "id": path_id(p),
            "path": p,
            "size": i,
            "mtime_ns": i,
            "hash": "h",
            "width": 1,
            "height": 1,
            "meta": "{}",
        }
        for i, p in enumerate(ODD)
    ]
    store.upsert(rows, np.eye(len(ODD), 4, dtype=np.float32))
    assert set(store.stats()) == set(ODD)
    assert {r["path"] for r in store.fetch(path_id(p) for p in ODD).values()} == set(ODD)

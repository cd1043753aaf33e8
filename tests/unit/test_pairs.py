"""The one pairs reader: every format, the caption alias, paths, bad rows counted, structural errors, tar shards."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from retrieval.data.pairs import PairStats, detect_format, expand_braces, iter_pairs
from retrieval.data.synth import SynthConfig, generate
from retrieval.errors import UserError


def jpeg(color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """tmp/imgs/a.jpg, b.jpg; tables are written to tmp/ and refer to images relative to themselves."""
    (tmp_path / "imgs").mkdir()
    for name in ("a", "b"):
        (tmp_path / "imgs" / f"{name}.jpg").write_bytes(jpeg())
    return tmp_path


def read(source: Path | str, **kw) -> tuple[list, PairStats]:
    stats = PairStats()
    return list(iter_pairs(source, stats, **kw)), stats


def test_jsonl_relative_absolute_extra_and_bad_rows(images: Path) -> None:
    absolute = str(images / "imgs" / "b.jpg")
    lines = [
        json.dumps(
            {"image": "imgs/a.jpg", "caption": " a red square ", "noisy": True, "objects": [{"c": 1}]}
        ),
        json.dumps({"image": absolute, "caption": "another"}),
        "",
        "{not json",
        json.dumps({"image": "imgs/missing.jpg", "caption": "gone"}),
        json.dumps({"image": "imgs/a.jpg", "caption": "   "}),
        json.dumps(["a", "list"]),
        json.dumps({"image": "imgs/b.jpg"}),
    ]
    (images / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    pairs, stats = read(images / "pairs.jsonl")
    assert [p.caption for p in pairs] == ["a red square", "another"]
    assert pairs[0].image == pairs[0].key == str(images / "imgs" / "a.jpg")  # relative to the file's folder
    assert pairs[1].image == absolute
    assert pairs[0].extra == {"noisy": True, "objects": [{"c": 1}]}
    assert stats.read == 2
    assert stats.skipped == {"bad row": 3, "missing image file": 1, "empty caption": 1}
    assert stats.examples["bad row"] == ["pairs.jsonl:4", "pairs.jsonl:7", "pairs.jsonl:8"]
    assert stats.examples["missing image file"] == [str(images / "imgs" / "missing.jpg")]
    assert "missing image file 1" in stats.summary()


def test_check_files_off_keeps_rows_with_missing_images(images: Path) -> None:
    (images / "p.jsonl").write_text(json.dumps({"image": "nope.jpg", "caption": "x"}) + "\n")
    assert read(images / "p.jsonl")[0] == []
    pairs, stats = read(images / "p.jsonl", check_files=False)
    assert [p.image for p in pairs] == [str(images / "nope.jpg")] and not stats.skipped


@pytest.mark.parametrize("fmt,delimiter", [("csv", ","), ("tsv", "\t")])
def test_csv_and_tsv_with_text_alias(images: Path, fmt: str, delimiter: str) -> None:
    path = images / f"pairs.{fmt}"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(["id", "image", "text"])
        w.writerow(["1", "imgs/a.jpg", 'a "quoted", comma\tcaption' if fmt == "csv" else 'a "quoted", comma'])
        w.writerow(["2", "imgs/b.jpg", ""])
        w.writerow(["3", "imgs/b.jpg"])  # a short row
        w.writerow(["4", "imgs/b.jpg", "x" * 200_000])  # over the csv module's field limit
        w.writerow(["5", "imgs/b.jpg", "after the long one"])
    pairs, stats = read(path)
    assert detect_format(path) == fmt
    assert len(pairs) == 2 and pairs[0].caption.startswith('a "quoted", comma')
    assert pairs[1].caption == "after the long one"
    assert pairs[0].extra == {"id": "1"} and pairs[0].image == str(images / "imgs" / "a.jpg")
    assert stats.skipped == {"empty caption": 1, "bad row": 2}


def test_caption_wins_over_text_which_stays_in_extra(images: Path) -> None:
    (images / "p.jsonl").write_text(json.dumps({"image": "imgs/a.jpg", "caption": "c", "text": "t"}) + "\n")
    (pair,), _ = read(images / "p.jsonl")
    assert pair.caption == "c" and pair.extra == {"text": "t"}


def test_parquet_streams_batches(images: Path) -> None:
    n = 2500  # more than one 1024-row batch
    table = pa.table(
        {
            "image": ["imgs/a.jpg", "imgs/missing.jpg", "imgs/b.jpg"] * (n // 3) + ["imgs/a.jpg"] * (n % 3),
            "caption": [f"caption {i}" if i != 6 else None for i in range(n)],  # row 6 has an image
            "score": list(range(n)),
        }
    )
    pq.write_table(table, images / "pairs.parquet", row_group_size=500)
    pairs, stats = read(images / "pairs.parquet")
    missing = n // 3
    assert stats.skipped == {"missing image file": missing, "empty caption": 1}
    assert len(pairs) == stats.read == n - missing - 1
    assert pairs[-1].caption == f"caption {n - 1}" and pairs[-1].extra == {"score": n - 1}


def test_parquet_image_bytes(tmp_path: Path) -> None:
    data = jpeg("blue")
    pq.write_table(pa.table({"image": [data], "caption": [" blue\n"]}), tmp_path / "b.parquet")
    (pair,), _ = read(tmp_path / "b.parquet")
    assert pair.image == data and pair.key == "b.parquet#1" and pair.caption == "blue"


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_missing_column_is_a_user_error(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"bad.{fmt}"
    if fmt == "jsonl":
        path.write_text(json.dumps({"path": "a.jpg", "caption": "x"}) + "\n")
    elif fmt == "csv":
        path.write_text("image,label\na.jpg,x\n")
    else:
        pq.write_table(pa.table({"image": ["a.jpg"], "title": ["x"]}), path)
    with pytest.raises(UserError) as e:
        list(iter_pairs(path))
    message = str(e.value)
    assert str(path) in message and "caption" in message and "\n" not in message
    assert (
        "path" if fmt == "jsonl" else "label" if fmt == "csv" else "title"
    ) in message  # the columns found


def test_folder_with_sidecar_txt_is_recursive(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "x.jpg").write_bytes(jpeg())
    (tmp_path / "x.txt").write_text("top level\n")
    (tmp_path / "sub" / "deeper" / "y.PNG").write_bytes(jpeg())
    (tmp_path / "sub" / "deeper" / "y.txt").write_text("nested")
    (tmp_path / "sub" / "lonely.jpg").write_bytes(jpeg())
    (tmp_path / "sub" / "blank.webp").write_bytes(jpeg())
    (tmp_path / "sub" / "blank.txt").write_text("\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert detect_format(tmp_path) == "folder"
    pairs, stats = read(tmp_path)
    assert {Path(p.image).relative_to(tmp_path).as_posix(): p.caption for p in pairs} == {
        "x.jpg": "top level",
        "sub/deeper/y.PNG": "nested",
    }
    assert stats.skipped == {"no caption for image": 1, "empty caption": 1}
    assert stats.examples["no caption for image"] == [str(tmp_path / "sub" / "lonely.jpg")]


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_tar_shard_groups_members_by_key(tmp_path: Path) -> None:
    img = jpeg()
    write_shard(
        tmp_path / "s.tar",
        [
            ("0001", {"jpg": img, "txt": b"first"}),
            ("d/0002", {"png": img, "txt": "zw\u00f6lf".encode(), "json": b'{"noisy": false}'}),
            ("0003", {"jpg": img}),
            ("0004", {"txt": b"no image"}),
            ("0005", {"txt": b"  ", "webp": img}),
            ("0006.x", {"jpeg": img, "txt": b"dotted stem"}),
        ],
    )
    assert detect_format(tmp_path / "s.tar") == "tar"
    pairs, stats = read(tmp_path / "s.tar")
    assert [(p.key, p.caption) for p in pairs] == [
        ("s.tar/0001", "first"),
        ("s.tar/d/0002", "zw\u00f6lf"),
    ]
    assert pairs[0].image == img and pairs[1].extra == {"noisy": False}
    # WebDataset: the key ends at the basename's first dot, so 0006.x.jpeg is member "x.jpeg" of sample 0006
    assert stats.skipped == {
        "no caption for image": 1,
        "no image for caption": 1,
        "empty caption": 1,
        "no image or caption member": 1,
    }
    assert stats.examples["no image or caption member"] == ["s.tar/0006"]


def test_tar_folder_brace_pattern_and_missing_shard(tmp_path: Path) -> None:
    for i in range(3):
        write_shard(
            tmp_path / f"shard-{i:03d}.tar", [(f"{i}", {"jpg": jpeg(), "txt": f"caption {i}".encode()})]
        )
    pattern = str(tmp_path / "shard-{000..002}.tar")
    assert detect_format(pattern) == "tar" and detect_format(tmp_path) == "tar"
    assert [p.key for p in read(pattern)[0]] == ["shard-000.tar/0", "shard-001.tar/1", "shard-002.tar/2"]
    assert [p.caption for p in read(tmp_path)[0]] == ["caption 0", "caption 1", "caption 2"]
    assert [p.key for p in read(str(tmp_path / "shard-{000,002}.tar"))[0]] == [
        "shard-000.tar/0",
        "shard-002.tar/2",
    ]
    with pytest.raises(UserError, match="1 of 4 shards missing"):
        iter_pairs(str(tmp_path / "shard-{000..003}.tar"))  # at the call, before any shard is read


def test_truncated_shard_is_counted_not_fatal(tmp_path: Path) -> None:
    write_shard(tmp_path / "t.tar", [(f"{i}", {"jpg": jpeg() * 50, "txt": b"c"}) for i in range(4)])
    data = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(data[: len(data) // 2])
    pairs, stats = read(tmp_path / "t.tar")
    assert 0 < len(pairs) < 4 and stats.skipped.get("corrupt shard") == 1


def test_expand_braces() -> None:
    assert expand_braces("s-{08..11}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_detect_format_refuses_unknown_and_missing(tmp_path: Path) -> None:
    (tmp_path / "pairs.xlsx").write_text("")
    with pytest.raises(UserError, match=r"pairs\.xlsx.*accepted: .*jsonl"):
        detect_format(tmp_path / "pairs.xlsx")
    with pytest.raises(UserError, match="no such file"):
        iter_pairs(tmp_path / "absent.jsonl")


def test_examples_are_capped(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text(
        "".join(json.dumps({"image": f"{i}.jpg", "caption": "c"}) + "\n" for i in range(9))
    )
    _, stats = read(tmp_path / "p.jsonl")
    assert stats.skipped == {"missing image file": 9} and len(stats.examples["missing image file"]) == 5


def test_reads_synth_output_with_its_fields(tmp_path: Path) -> None:
    generate(tmp_path, SynthConfig(n=10, noise=0.5), progress=False)
    pairs, stats = read(tmp_path / "train.jsonl")
    assert len(pairs) == 8 and not stats.skipped
    assert all(
        Path(p.image).is_file() and {"noisy", "clean_caption", "objects", "relation"} <= set(p.extra)
        for p in pairs
    )
    assert sum(p.extra["noisy"] for p in pairs) == 4

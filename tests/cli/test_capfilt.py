"""Caption bootstrapping end to end on tiny models: train --task caption, caption, eval --captioner, bootstrap in
every pairs format, kill -9 and resume, capfilt's stages and the separation of filter and captioner weights."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from retrieval.data.pairs import load_pairs
from tests.cli.conftest import invoke, sets
from tests.tiny_train import TINY_MODEL

TINY_CAPTIONER = ["caption.width=32", "caption.layers=1", "caption.heads=2"]
TINY_LOOP = [
    "--arch",
    "test-micro",
    "--steps",
    "4",
    "--refine-steps",
    "3",
    "--filter-steps",
    "3",
    "--captioner-steps",
    "6",
    *sets(
        "model.fusion.width=32",
        "model.fusion.layers=1",
        "model.fusion.heads=2",
        "batch_size=16",
        "refine.batch_size=8",
        *TINY_CAPTIONER,
    ),
]


@pytest.fixture(scope="module")
def loop(tmp_path_factory, runner_module):
    """A tiny capfilt run: noisy and clean synth scenes, and every stage's output."""
    root = tmp_path_factory.mktemp("capfilt")
    noisy, clean, out = root / "noisy", root / "clean", root / "out"
    for folder, extra in ((noisy, ["--noise", "0.3"]), (clean, ["--seed", "5"])):
        result = invoke(runner_module, "data", "synth", folder, "-n", "80", "--image-size", "48", *extra)
        assert result.exit_code == 0, result.output
    result = invoke(
        runner_module,
        "capfilt",
        noisy / "train.jsonl",
        "--clean",
        clean / "train.jsonl",
        "--out",
        out,
        "--eval",
        noisy / "heldout.jsonl",
        "-q",
        *TINY_LOOP,
    )
    assert result.exit_code == 0, result.output
    return noisy, clean, out


@pytest.fixture(scope="module")
def runner_module():
    from typer.testing import CliRunner

    return CliRunner()


def test_capfilt_leaves_every_stage_and_resumes_by_skipping(loop, runner_module):
    noisy, clean, out = loop
    for name in ("captioner", "filter", "model", "pretrain"):
        assert (out / name / "config.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert {"pretrain", "model", "captioner"} <= set(report["eval"])
    assert 0 <= report["filter"]["threshold"] <= 1
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert rows and all(r["kept"] and r["source"] in ("web", "synthetic") for r in rows)
    assert all(not r["kept"] and r["source"] == "web" for r in dropped)
    assert all(isinstance(r["score"], float) for r in rows + dropped)
    given = {json.loads(x)["image"] for x in (noisy / "train.jsonl").read_text().splitlines()}
    assert {r["input_image"] for r in rows + dropped} <= given  # the image as the input names it
    assert len(load_pairs(out / "pairs.jsonl")) == len(rows)  # trainable as it is: every image path resolves
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    before = (out / "model" / "config.json").stat().st_mtime_ns
    result = invoke(
        runner_module,
        "capfilt",
        noisy / "train.jsonl",
        "--clean",
        clean / "train.jsonl",
        "--out",
        out,
        "-q",
        *TINY_LOOP,
    )
    assert result.exit_code == 0, result.output
    again = json.loads((out / "report.json").read_text())["stages"]
    assert all(again[s]["result"] == "skipped" for s in ("pretrain", "filter", "captioner", "model"))
    assert (out / "model" / "config.json").stat().st_mtime_ns == before


def test_filter_and_captioner_weights_are_separate(loop):
    from safetensors.torch import load_file

    _, _, out = loop
    cap = json.loads((out / "captioner" / "config.json").read_text())
    filt = json.loads((out / "filter" / "config.json").read_text())
    assert "captioner" in cap["components"] and "fusion" not in cap["components"]
    assert "fusion" in filt["components"] and "captioner" not in filt["components"]
    a = load_file(out / "captioner" / "dual_encoder.safetensors")
    b = load_file(out / "filter" / "dual_encoder.safetensors")
    # each was trained on its own from the pretrained model: two copies, and they differ
    assert any(not (a[k] == b[k]).all() for k in a if a[k].is_floating_point())


def test_train_caption_checkpoints_and_resumes(loop, runner_module, tmp_path):
    _, clean, _ = loop
    args = [
        "train",
        clean / "train.jsonl",
        "--task",
        "caption",
        "-q",
        *sets(*TINY_MODEL, *TINY_CAPTIONER, "steps=4", "save_every=2"),
    ]
    result = invoke(runner_module, *args, "--out", tmp_path / "a", "--stop-after", "2")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a" / "config.json").read_text())["training"]["step"] == 2
    result = invoke(runner_module, *args, "--out", tmp_path / "a", "--resume")
    assert result.exit_code == 0, result.output
    result = invoke(runner_module, *args, "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    logs = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in "ab"]
    assert [r["step"] for r in logs[0]] == [1, 2, 3, 4]
    assert [r["lm"] for r in logs[0]] == pytest.approx([r["lm"] for r in logs[1]], abs=1e-4)
    assert (tmp_path / "a" / "captioner.safetensors").read_bytes() == (
        tmp_path / "b" / "captioner.safetensors"
    ).read_bytes()


def test_caption_json_on_a_folder(loop, runner_module):
    noisy, _, out = loop
    result = invoke(
        runner_module,
        "caption",
        noisy / "images" / "heldout",
        "--checkpoint",
        out / "captioner",
        "--json",
        "-q",
    )
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert len(found) == 16 and all(set(r) == {"path", "caption"} and r["caption"] for r in found)
    beams = invoke(
        runner_module,
        "caption",
        noisy / "images" / "heldout",
        "--checkpoint",
        out / "captioner",
        "--json",
        "-q",
        "--beams",
        "3",
        "--max-len",
        "4",
    )
    assert beams.exit_code == 0 and all(len(r["caption"].split()) <= 4 for r in json.loads(beams.stdout))


def test_eval_captioner_reports_caption_metrics(loop, runner_module):
    noisy, _, out = loop
    result = invoke(
        runner_module, "eval", noisy / "heldout.jsonl", "--captioner", out / "captioner", "--json"
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert {"bleu4", "cider", "synth_correct"} <= set(metrics) and metrics["images"] == 16


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "tar"])
def test_bootstrap_writes_the_input_format(loop, runner_module, tmp_path, fmt):
    import pyarrow as pa
    import pyarrow.parquet as pq

    noisy, _, out = loop
    rows = [json.loads(x) for x in (noisy / "train.jsonl").read_text().splitlines()][:12]
    src = tmp_path / f"in.{fmt}"
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        src.write_text(
            "image"
            + sep
            + "caption\n"
            + "".join(f'{noisy / r["image"]}{sep}"{r["caption"]}"\n' for r in rows)
        )
    elif fmt == "parquet":
        pq.write_table(
            pa.Table.from_pylist([{"image": str(noisy / r["image"]), "caption": r["caption"]} for r in rows]),
            src,
        )
    else:
        from retrieval.pipelines.bootstrap_io import tar_bytes

        src.write_bytes(
            tar_bytes(
                [
                    (f"s{i:03d}", (noisy / r["image"]).read_bytes(), r["caption"], {})
                    for i, r in enumerate(rows)
                ]
            )
        )
    before = src.read_bytes()
    result = invoke(
        runner_module,
        "bootstrap",
        src,
        "--out",
        tmp_path / "boot",
        "--captioner",
        out / "captioner",
        "--filter",
        out / "filter",
        "--samples",
        "2",
        "--json",
        "-q",
    )
    assert result.exit_code == 0, result.output
    assert src.read_bytes() == before  # the input is never modified
    report = json.loads(result.stdout)
    kept = tmp_path / "boot" / ("pairs" if fmt == "tar" else f"pairs.{fmt}")
    pairs = load_pairs(kept)
    assert len(pairs) == report["web_kept"] + report["synthetic_kept"]
    extra = pairs[0].extra
    assert {"source", "score", "kept", "input_image", "captioner", "filter"} <= set(extra)
    assert str(extra["kept"]) in ("True", "true") or extra["kept"] is True


def test_bootstrap_without_filter_keeps_everything(loop, runner_module, tmp_path):
    noisy, _, out = loop
    result = invoke(
        runner_module,
        "bootstrap",
        noisy / "train.jsonl",
        "--out",
        tmp_path / "b",
        "--captioner",
        out / "captioner",
        "--samples",
        "1",
        "--json",
        "-q",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["web_dropped"] == 0 and report["web_kept"] == 64 and report["synthetic_kept"] >= 64


def _bootstrap_cmd(noisy, out, dest):
    return [
        sys.executable,
        "-m",
        "cli.main",
        "bootstrap",
        str(noisy / "train.jsonl"),
        "--out",
        str(dest),
        "--captioner",
        str(out / "captioner"),
        "--filter",
        str(out / "filter"),
        "--samples",
        "4",
        "--shard-images",
        "4",
        "-q",
    ]


@pytest.mark.slow  # three fresh processes: ~15 s of imports on a loaded 2-core machine
def test_kill_9_mid_bootstrap_then_resume_is_byte_identical(loop, tmp_path):
    noisy, _, out = loop
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(
        _bootstrap_cmd(noisy, out, tmp_path / "whole"), env=env, capture_output=True, text=True
    )
    assert whole.returncode == 0, whole.stderr
    parts = tmp_path / "cut" / ".bootstrap" / "parts"
    proc = subprocess.Popen(_bootstrap_cmd(noisy, out, tmp_path / "cut"), env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("part-*.jsonl"))) < 3:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.jsonl")}
    assert 3 <= len(finished) < 16, "the run was killed mid-way"
    assert not (tmp_path / "cut" / "pairs.jsonl").exists()
    again = subprocess.run(
        _bootstrap_cmd(noisy, out, tmp_path / "cut"), env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    for name in ("pairs.jsonl", "dropped.jsonl", "bootstrap.json"):
        a, b = (tmp_path / "whole" / name).read_bytes(), (tmp_path / "cut" / name).read_bytes()
        assert a.replace(b"whole", b"cut") == b, name
    for name, mtime in finished.items():  # finished shards were not redone
        assert (parts / name).stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    "args, expected",
    [
        (["caption", "IMG", "--checkpoint", "MISSING"], "not a checkpoint directory"),
        (["caption", "IMG", "--checkpoint", "FILTER"], "not a captioner checkpoint"),
        (["bootstrap", "PAIRS", "--out", "OUT", "--filter", "CAPTIONER"], "no ITM head"),
        (["bootstrap", "PAIRS", "--out", "OUT", "--captioner", "FILTER"], "not a captioner checkpoint"),
        (["eval", "PAIRS", "--captioner", "FILTER"], "not a captioner checkpoint"),
        (["bootstrap", "PAIRS", "--out", "OUT"], "needs --captioner, --filter"),
        (
            ["capfilt", "PAIRS", "--clean", "PAIRS", "--out", "OUT", "-q", "--image-weights", "MISSING"],
            "no such file",
        ),
    ],
)
def test_bad_inputs_fail_in_one_line(loop, runner_module, tmp_path, args, expected):
    noisy, _, out = loop
    names = {
        "IMG": noisy / "images" / "heldout",
        "MISSING": tmp_path / "nope",
        "FILTER": out / "filter",
        "CAPTIONER": out / "captioner",
        "PAIRS": noisy / "train.jsonl",
        "OUT": tmp_path / "o",
    }
    result = invoke(runner_module, *[names.get(a, a) for a in args])
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and result.exception is None or isinstance(result.exception, SystemExit)
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""

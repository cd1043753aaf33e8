import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from tests.tiny_train import TINY_MODEL

BROKEN = {"truncated.jpg", "empty.png", "notes.jpg"}


def make_images(folder: Path, n: int, seed: int = 0, start: int = 0) -> list[Path]:
    """n small distinct images (JPEG and PNG, a few in subfolders)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(start, start + n):
        sub = folder / f"set{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        arr = np.full((48, 64, 3), rng.integers(0, 255, 3), np.uint8)
        y, x = rng.integers(0, 30), rng.integers(0, 40)
        arr[y : y + 16, x : x + 20] = rng.integers(0, 255, 3)
        path = sub / (f"img_{i:04d}.jpg" if i % 2 else f"img_{i:04d}.png")
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def add_broken(folder: Path) -> None:
    good = folder / "set0" / "img_0000.png"
    good.parent.mkdir(parents=True, exist_ok=True)
    buf = bytearray(Image.new("RGB", (64, 64), (200, 10, 10)).tobytes())
    Image.frombytes("RGB", (64, 64), bytes(buf)).save(folder / "full.jpg")
    data = (folder / "full.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "full.jpg").unlink()
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image at all")


# a tiny training configuration: seconds per run on 2 cores, every phase of training included
TINY = [
    *TINY_MODEL,
    "refine.steps=3",  # the ITM refinement stage runs too (on rank 0 alone under torchrun)
    "refine.batch_size=8",
]


def sets(*items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """120 generated scenes and a checkpoint trained on them (4 joint steps + 3 refinement steps), made once per
    session, in process: the commands that read a checkpoint share it instead of paying for their own."""
    root = tmp_path_factory.mktemp("tiny-run")
    scenes, ck = root / "scenes", root / "ck"
    runner = CliRunner()
    result = invoke(runner, "data", "synth", scenes, "-n", "120", "--image-size", "48")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # a summary goes to stderr: stdout is for --json
    result = invoke(runner, "train", scenes / "train.jsonl", "--out", ck, "-q", *sets(*TINY, "steps=4"))
    assert result.exit_code == 0, result.output
    return scenes, ck


@pytest.fixture
def runner():
    return CliRunner()


def invoke(runner, *args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def run_cli(*args, **kw):
    """The real console entry point in a fresh process (what a user's shell does)."""
    env = {**kw.pop("env", os.environ), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *map(str, args)], capture_output=True, text=True, env=env, **kw
    )


def load_json(text: str):
    return json.loads(text)


def session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`: a command started with start_new_session=True and every
    process it started, whoever their parent is now."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
            pids.append(int(entry))
    return pids


def wait_until_gone(sid: int, seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while (alive := session_processes(sid)) and time.time() < deadline:
        time.sleep(0.1)
    return alive


def committed_versions(db: Path) -> int:
    """Lance commits so far (one version file each): how a test knows a run is past its first commits."""
    versions = db / "images.lance" / "_versions"
    return len(list(versions.iterdir())) if versions.is_dir() else 0

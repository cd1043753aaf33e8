"""The training commands end to end: data synth -> train -> eval / index / search, kill -9 + --resume, torchrun."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from retrieval.eval.metrics import ITM_WEIGHT
from tests.cli.conftest import TINY, invoke, run_cli, sets


@pytest.fixture(scope="module")
def scenes(tiny_run):
    return tiny_run[0]


def test_train_eval_index_search(runner, tiny_run, tmp_path):
    scenes, ck = tiny_run
    result = invoke(runner, "eval", scenes / "heldout.jsonl", "--checkpoint", ck, "--rerank", "4", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    for key in (
        "t2i.R@1",
        "t2i.R@5",
        "i2t.R@1",
        "rerank.t2i.R@1",
        "rerank_itm.t2i.R@1",
        "binding",
        "binding.itc",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key
    db = tmp_path / "db"
    result = invoke(runner, "index", scenes / "images" / "heldout", "--db", db, "--checkpoint", ck, "-q")
    assert result.exit_code == 0, result.output

    def search(*args):
        result = invoke(runner, "search", "a large red circle", "--db", db, *args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    hits = search("-k", "3")
    assert len(hits) == 3 and all(os.path.exists(h["path"]) for h in hits)
    # --rerank re-orders the index's top K by the collection's own checkpoint's ITM head
    plain = search("-k", "6")
    reranked = search("-k", "6", "--rerank", "6")
    assert {h["path"] for h in reranked} == {h["path"] for h in plain}
    fused = [h["rerank"] for h in reranked]
    assert fused == sorted(fused, reverse=True) and all(0.0 <= h["itm"] <= 1.0 for h in reranked)
    # the score sorted by is the contrastive logit (one scale for all hits) plus the weighted ITM log-odds
    clipped = [min(max(h["itm"], 1e-6), 1 - 1e-6) for h in reranked]
    scales = [
        (h["rerank"] - ITM_WEIGHT * math.log(p / (1 - p))) / h["score"]
        for h, p in zip(reranked, clipped, strict=True)
    ]
    assert max(scales) - min(scales) < 1e-2 * max(abs(x) for x in scales)
    # the real console entry point, in a fresh process: a bad query is one line and exit 2
    bad = run_cli("search", "red + circle", "--db", db, "--rerank", "4")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "plain text" in bad.stderr


def test_bad_training_input_is_one_line_exit_2(runner, scenes, tmp_path):
    for args in (
        ["train", tmp_path / "nope.jsonl", "--out", tmp_path / "o"],
        ["train", scenes / "train.jsonl", "--out", tmp_path / "o", "--set", "optim.lrr=1"],
        ["eval", scenes / "heldout.jsonl", "--checkpoint", tmp_path],
    ):
        result = invoke(runner, *args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.slow
def test_kill_9_then_resume_ends_at_the_same_step_with_a_continuous_log(scenes, tmp_path):
    ck = tmp_path / "ck"
    args = ["train", scenes / "train.jsonl", "--out", ck, "-q", *sets(*TINY, "steps=400", "save_every=5")]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *map(str, args)], stderr=subprocess.DEVNULL)
    state = ck / "resume" / "state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len((ck / "log.jsonl").read_text().splitlines())
    assert killed_at < 400

    # no --set: a resumed run takes its own saved config (the default one would not fit its state)
    result = run_cli("train", scenes / "train.jsonl", "--out", ck, "-q", "--resume", "--stop-after", "60")
    assert result.returncode == 0, result.stderr
    steps = [json.loads(line)["step"] for line in (ck / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))  # no gap, no duplicate where it was killed


def test_ctrl_c_keeps_a_checkpoint_of_the_last_step_and_resume_continues(scenes, tmp_path):
    ck = tmp_path / "ck"
    args = ["train", scenes / "train.jsonl", "--out", ck, "-q", *sets(*TINY, "steps=400", "save_every=1000")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", *map(str, args)], stderr=subprocess.PIPE, text=True
    )
    log = ck / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be stopped"
    os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: stopped at step ") and "--resume" in last
    step = int(last.split("stopped at step ")[1].split()[0])
    assert f"the checkpoint of step {step} " in last  # save_every=1000: saved because it was stopped
    assert json.loads((ck / "config.json").read_text())["training"]["step"] == step

    result = run_cli("train", scenes / "train.jsonl", "--out", ck, "-q", "--resume", "--stop-after", step + 2)
    assert result.returncode == 0, result.stderr
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, step + 3))


@pytest.mark.slow
def test_torchrun_two_gloo_processes(scenes, tmp_path):
    ck = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "cli.main",
        "train",
        str(scenes / "train.jsonl"),
        "--out",
        str(ck),
        "-q",
        *sets(*TINY, "steps=3", "device=cpu"),
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    log = [json.loads(line) for line in (ck / "log.jsonl").read_text().splitlines()]
    # rank 0 alone writes the log, and runs the refinement stage (steps 4-6) while the other rank waits
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r.get("stage") for r in log] == [None, None, None, "refine", "refine", "refine"]
    assert (ck / "dual_encoder.safetensors").exists() and (ck / "fusion.safetensors").exists()

"""`train --task vlm`, `ask`, `eval --vqa` and `data synth --vqa` end to end, on a tiny random Llama."""

import json

import pytest

from tests.cli.conftest import invoke, sets
from tests.tiny_llm import make_tiny_llm

TINY_VLM = [
    "stage1_steps=0",
    "steps=4",
    "batch_size=4",
    "turns=2",
    "time_budget_min=0",
    "save_every=2",
    "log_every=1",
    "warmup_steps=1",
    "precision=fp32",
]


@pytest.fixture(scope="module")
def vlm_run(tmp_path_factory):
    """Scenes with questions, a tiny vision tower and LLM, and a VLM trained 2 + 2 steps (stopped, resumed)."""
    from typer.testing import CliRunner

    from retrieval.models.checkpoint import save_checkpoint
    from retrieval.models.encoders import create_clip

    root = tmp_path_factory.mktemp("vlm-cli")
    runner = CliRunner()
    result = invoke(runner, "data", "synth", root / "scenes", "-n", "24", "--image-size", "48", "--vqa")
    assert result.exit_code == 0, result.output
    clip, _ = create_clip("test-micro")
    save_checkpoint(root / "vision", "test-micro", {"dual_encoder": clip})
    llm = make_tiny_llm(root / "llm", chat=True)
    args = [
        "train",
        root / "scenes" / "vqa_train.jsonl",
        "--out",
        root / "ck",
        "--task",
        "vlm",
        "-q",
        "--vision",
        root / "vision",
        *sets(f"llm={llm}", *TINY_VLM),
    ]
    first = invoke(runner, *args, "--stop-after", "2")
    assert first.exit_code == 0, first.output
    resumed = invoke(runner, *args[: -2 * len(TINY_VLM) - 2], "--resume")  # the run's own config and tower
    assert resumed.exit_code == 0, resumed.output
    return root, llm


def test_data_synth_vqa_writes_every_kind(vlm_run):
    root, _ = vlm_run
    for split in ("train", "heldout"):
        rows = [
            json.loads(line) for line in (root / "scenes" / f"vqa_{split}.jsonl").read_text().splitlines()
        ]
        assert {"color", "shape", "size", "count"} <= {r["kind"] for r in rows}
        assert all(r["image"].startswith(f"images/{split}/") for r in rows)
        assert all(len(r["answer"].split()) == 1 for r in rows)


def test_train_vlm_stops_and_resumes(vlm_run):
    root, _ = vlm_run
    log = [json.loads(line) for line in (root / "ck" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    config = json.loads((root / "ck" / "config.json").read_text())
    assert config["format"] == "retrieval-vlm" and config["training"]["step"] == 4
    assert config["connector"]["type"] == "mlp2x_gelu" and config["llm"]["digest"]


def test_ask_single_and_batch(vlm_run, runner):
    root, _ = vlm_run
    image = root / "scenes" / "images" / "train" / "000000.jpg"
    result = invoke(
        runner,
        "ask",
        image,
        "what colour is the circle ?",
        "--checkpoint",
        root / "ck",
        "--max-new-tokens",
        "3",
    )
    assert result.exit_code == 0, result.output
    result = invoke(
        runner,
        "ask",
        "--batch",
        root / "scenes" / "vqa_heldout.jsonl",
        "--checkpoint",
        root / "ck",
        "--json",
        "-q",
        "--max-new-tokens",
        "3",
        "--temperature",
        "1.0",
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    n = len((root / "scenes" / "vqa_heldout.jsonl").read_text().splitlines())
    assert len(rows) == n and set(rows[0]) == {"image", "question", "answer"}


def test_eval_vqa(vlm_run, runner):
    root, _ = vlm_run
    result = invoke(
        runner, "eval", "--vqa", root / "scenes" / "vqa_heldout.jsonl", "--checkpoint", root / "ck", "--json"
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert 0 <= scores["accuracy"] <= 1 and set(scores["per_kind"]) >= {"color", "count"}


def test_ask_errors_are_one_line(vlm_run, runner, tmp_path):
    root, _ = vlm_run
    image = root / "scenes" / "images" / "train" / "000000.jpg"
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    other = make_tiny_llm(tmp_path / "other", seed=3)
    cases = [
        ([image, "what colour ?", "--llm", other], "trained with the LLM"),
        ([image, "what colour ?", "--vision", "test-micro"], "trained with the vision tower"),
        ([image, "what colour ?", "--template", "{question}"], "placeholder"),
        ([bad, "what colour ?"], "not a readable image"),
        ([image, "   "], "empty"),
    ]
    for args, message in cases:
        result = invoke(runner, "ask", *args, "--checkpoint", root / "ck")
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.output


def test_lora_stage_from_a_checkpoint(vlm_run, runner):
    root, llm = vlm_run
    out = root / "lora"
    args = [
        "train",
        root / "scenes" / "vqa_train.jsonl",
        "--out",
        out,
        "--task",
        "vlm",
        "-q",
        "--vision",
        root / "vision",
        *sets(
            f"llm={llm}",
            *TINY_VLM,
            "tune=lora",
            'lora.targets=["q_proj"]',
            f"init_checkpoint={root / 'ck'}",
            "steps=2",
        ),
    ]
    result = invoke(runner, *args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["tune"] == "lora" and set(config["components"]) == {"connector", "lora"}
    image = root / "scenes" / "images" / "train" / "000000.jpg"
    result = invoke(
        runner,
        "ask",
        image,
        "what colour is the circle ?",
        "--checkpoint",
        out,
        "--json",
        "--max-new-tokens",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["question"] == "what colour is the circle ?"
    bad = invoke(
        runner, *args, "--set", f"init_checkpoint={out}", "--set", "tune=frozen", "--out", root / "x"
    )
    assert bad.exit_code == 2 and "tune=lora" in bad.stderr

"""VQA accuracy: exact match of the answer, case and punctuation ignored, overall and per kind of question."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from retrieval.errors import UserError

_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """'Red.' -> 'red'; '  Two  shapes!' -> 'two shapes'."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(predicted: list[str], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """{"accuracy", "n", "per_kind": {kind: accuracy}} of predictions against rows' "answer" (and "kind")."""
    hits: dict[str, list[int]] = defaultdict(list)
    for pred, row in zip(predicted, rows, strict=True):
        hits[row.get("kind") or "all"].append(
            int(normalize_answer(pred) == normalize_answer(str(row["answer"])))
        )
    every = [h for v in hits.values() for h in v]
    return {
        "accuracy": round(sum(every) / max(1, len(every)), 4),
        "n": len(every),
        "per_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(hits.items())},
    }


def read_questions(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows with image (resolved against the file's folder), question and answer."""
    path = Path(path)
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from e
    rows = []
    for n, line in enumerate(lines[:limit] if limit else lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not JSON ({e.msg})") from e
        if not row.get("image") or not row.get("question"):
            raise UserError(f"{path}:{n}: a row needs image and question")
        rows.append({**row, "image_path": str(path.parent / row["image"])})
    return rows


def evaluate_vqa(
    vlm, questions: str | Path, limit: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Answer every row greedily and score it."""
    from retrieval.pipelines.answer import AnswerConfig, answer_batch

    rows = read_questions(questions, limit)
    rows = [r for r in rows if "answer" in r]
    if not rows:
        raise UserError(f"{questions}: no rows with an answer to score")
    was = vlm.training
    vlm.eval()
    answers = answer_batch(
        vlm,
        [r["image_path"] for r in rows],
        [r["question"] for r in rows],
        AnswerConfig(max_new_tokens=6),
        progress,
    )
    vlm.train(was)
    return exact_match(answers, rows)

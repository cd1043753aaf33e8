"""`retrieval ask`: questions about images, answered by a VLM checkpoint (`retrieval train --task vlm`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.errors import handle_errors


@handle_errors
def ask(
    image: Annotated[Path | None, typer.Argument(help="The image to ask about")] = None,
    question: Annotated[
        str | None, typer.Argument(help='The question, e.g. "What colour is the circle?"')
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="A VLM checkpoint directory")
    ] = None,
    batch: Annotated[
        Path | None, typer.Option("--batch", help="JSONL rows of image + question, answered in batches")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per answer on stdout")] = False,
    template: Annotated[
        str | None,
        typer.Option(
            "--template", help="The user turn, with <image> and {question} [default: the checkpoint's]"
        ),
    ] = None,
    llm: Annotated[
        str | None, typer.Option("--llm", help="Where the checkpoint's LLM is now (must be the same)")
    ] = None,
    vision: Annotated[
        str | None,
        typer.Option("--vision", help="Where the checkpoint's vision tower is now (must be the same)"),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 24,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0: greedy")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample among the k likeliest (0: all)")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar")] = False,
) -> None:
    """Answer QUESTION about IMAGE (streamed), or every row of --batch."""
    from retrieval.errors import UserError

    if checkpoint is None:
        raise UserError("ask needs --checkpoint DIR, a VLM trained with `retrieval train --task vlm`")
    if batch is None and (image is None or question is None):
        raise UserError('give IMAGE "QUESTION", or --batch QUESTIONS.jsonl')
    if batch is None and not question.strip():
        raise UserError("the question is empty")
    if template is not None and ("<image>" not in template or "{question}" not in template):
        raise UserError(f"--template {template!r}: needs the <image> placeholder and {{question}}")
    import dataclasses

    from retrieval.models.vlm_checkpoint import load_vlm
    from retrieval.pipelines.answer import AnswerConfig, answer_batch, answer_stream

    vlm = load_vlm(checkpoint, llm=llm, vision=vision)
    if template is not None:
        vlm.prompt = dataclasses.replace(vlm.prompt, template=template)
    cfg = AnswerConfig(max_new_tokens, temperature, top_k, batch_size, seed)
    if batch is None:
        if json_out:
            answer = "".join(answer_stream(vlm, str(image), question, cfg)).strip()
            typer.echo(json.dumps({"image": str(image), "question": question, "answer": answer}))
            return
        for piece in answer_stream(vlm, str(image), question, cfg):
            typer.echo(piece, nl=False)
        typer.echo("")
        return
    from retrieval.eval.vqa import read_questions

    rows = read_questions(batch)
    answers = answer_batch(
        vlm, [r["image_path"] for r in rows], [r["question"] for r in rows], cfg, not quiet
    )
    for row, answer in zip(rows, answers, strict=True):
        record = {"image": row["image"], "question": row["question"], "answer": answer}
        typer.echo(json.dumps(record) if json_out else f"{row['image']}\t{row['question']}\t{answer}")

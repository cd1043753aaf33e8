"""`retrieval caption`, `retrieval bootstrap`, `retrieval capfilt` and eval's caption metrics: thin wrappers over
retrieval.pipelines.caption, .bootstrap and .capfilt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.errors import handle_errors


def _gen(beams: int, top_p: float, temperature: float, min_len: int, max_len: int, seed: int):
    from retrieval.errors import UserError
    from retrieval.models.generate import GenerateConfig

    if beams > 1 and top_p > 0:
        raise UserError("--beams and --top-p exclude each other: beam search, or nucleus sampling")
    if not 0 <= top_p <= 1 or temperature <= 0 or min_len > max_len:
        raise UserError(f"--top-p {top_p}, --temperature {temperature}, --min-len {min_len}, --max-len {max_len}: "
                        "need top-p in [0, 1], temperature > 0, min-len <= max-len")
    return GenerateConfig(beams=beams, top_p=top_p, temperature=temperature, min_len=min_len, max_len=max_len,
                          seed=seed)


@handle_errors
def caption(
    paths: Annotated[list[Path], typer.Argument(help="Images or folders of images")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A captioner checkpoint (train --task caption)")],
    json_out: Annotated[bool, typer.Option("--json", help="JSON on stdout: a list of {path, caption}")] = False,
    beams: Annotated[int, typer.Option("--beams", min=1, help="Beam search with N beams (1: greedy)")] = 1,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling with this top-p (0: off)")] = 0.0,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature")] = 1.0,
    min_len: Annotated[int, typer.Option("--min-len", min=0, help="Words at least")] = 1,
    max_len: Annotated[int, typer.Option("--max-len", min=1, help="Words at most")] = 20,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampling draws")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N]")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar")] = False,
) -> None:
    """Caption images or whole folders with a captioner checkpoint."""
    from retrieval.data.scan import scan_images
    from retrieval.errors import UserError
    from retrieval.models.captioner import load_captioner
    from retrieval.models.encoders import resolve_device
    from retrieval.pipelines.caption import caption_files

    gen = _gen(beams, top_p, temperature, min_len, max_len, seed)
    model, _, _ = load_captioner(checkpoint)
    files = [e.path for e in scan_images(paths)]
    if not files:
        raise UserError(f"no images under {', '.join(map(str, paths))}")
    results = caption_files(model, files, gen, resolve_device(device), batch_size, progress=not quiet)
    if json_out:
        typer.echo(json.dumps([{"path": r.path, "caption": r.caption, **({"error": r.error} if r.error else {})}
                               for r in results]))
        return
    for r in results:
        typer.echo(f"{r.path}\t{r.caption if r.caption is not None else '(' + str(r.error) + ')'}")


def caption_metrics(pairs: Path | None, captioner: Path, limit: int | None, device: str) -> dict:
    """`eval --captioner`: BLEU-4, CIDEr-D and synth correctness of greedy captions on PAIRS."""
    from retrieval.errors import UserError
    from retrieval.eval.captions import evaluate_captioner
    from retrieval.models.captioner import load_captioner
    from retrieval.models.encoders import resolve_device

    if pairs is None:
        raise UserError("eval --captioner needs PAIRS: the images to caption and their reference captions")
    model, _, _ = load_captioner(captioner)
    return evaluate_captioner(model, str(pairs), limit=limit, device=resolve_device(device), progress=True)

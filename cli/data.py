"""`retrieval data ...`: make and inspect datasets. Thin: parse arguments, call one library function, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Make datasets: generated captioned scenes for demos, tests and benchmarks.", no_args_is_help=True
)


@app.callback()
def _group() -> None:
    # a callback keeps `synth` a subcommand even while it is the only one (typer collapses one-command apps)
    pass


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (new, empty, or an earlier synth output)")],
    n: Annotated[int, typer.Option("-n", help="Total images over both splits")] = 2000,
    noise: Annotated[
        float, typer.Option("--noise", help="Fraction of train captions swapped for wrong ones")
    ] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same bytes")] = 0,
    image_size: Annotated[int, typer.Option("--image-size", help="Image side in pixels")] = 128,
    heldout_fraction: Annotated[
        float,
        typer.Option("--heldout-fraction", help="Share of images in heldout.jsonl (unseen combinations)"),
    ] = 0.2,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Render processes (output is the same)")
    ] = 2,
    captions: Annotated[
        int, typer.Option("--captions", min=1, help="Captions per image (rows per image)")
    ] = 1,
    wording: Annotated[
        str, typer.Option("--wording", help="fixed (one wording) or varied (a different one per caption)")
    ] = "fixed",
    vqa: Annotated[
        bool,
        typer.Option("--vqa", help="Also write vqa_train.jsonl, vqa_heldout.jsonl: questions and answers"),
    ] = False,
) -> None:
    """Write captioned scenes of coloured shapes: images/, train.jsonl, heldout.jsonl, heldout_binding.jsonl
    (caption + negative-caption triples for `eval --binding`), synth.json."""
    from retrieval.data.synth import SynthConfig, generate  # numpy and PIL load only when needed
    from retrieval.errors import UserError

    cfg = SynthConfig(
        n=n,
        heldout_fraction=heldout_fraction,
        image_size=image_size,
        noise=noise,
        seed=seed,
        workers=workers,
        captions=captions,
        wording=wording,
    )
    try:
        s = generate(out, cfg)
        if vqa:
            from retrieval.data.vqa import write_vqa

            s["vqa"] = write_vqa(out, seed)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(
        f"{s['out_dir']}: {s['train']} train + {s['heldout']} heldout images in {s['seconds']:.1f}s; "
        f"{s['noisy']} noisy train captions; held-out combos: {', '.join(s['heldout_combos'])}",
        err=True,
    )
    if vqa:
        typer.echo(
            f"questions: {s['vqa']['train']} train, {s['vqa']['heldout']} heldout (vqa_*.jsonl)", err=True
        )

"""The `retrieval` command. Thin: parse arguments, call one library function, print.

Heavy imports (torch, open_clip, lancedb) happen inside the commands so that `--help` is instant.
Exit status: 0 success, 1 runtime failure, 2 bad usage or bad input (one line on stderr).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli import data, output
from cli import train as train_cmds
from cli.errors import handle_errors

app = typer.Typer(
    help="Contrastive image-text retrieval: index and search image folders, train and evaluate models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data.app, name="data")
app.command(name="train")(train_cmds.train)
app.command(name="eval")(train_cmds.evaluate)


ModelOpt = Annotated[str, typer.Option("--model", help="OpenCLIP architecture, e.g. ViT-B-32, or a preset")]
PretrainedOpt = Annotated[
    str,
    typer.Option(
        "--pretrained", help="OpenCLIP pretrained tag, a local weights file, or 'none' (seeded random)"
    ),
]
CheckpointOpt = Annotated[
    Path | None, typer.Option("--checkpoint", help="A checkpoint directory of this toolkit")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N]")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of random init (with --pretrained none)")]


def encoder_config(model: str, pretrained: str, checkpoint: Path | None, seed: int, device: str):
    from retrieval.config import EncoderConfig

    return EncoderConfig(
        arch=model,
        pretrained=pretrained,
        checkpoint=str(checkpoint) if checkpoint else None,
        seed=seed,
        device=device,
    )


@app.command()
@handle_errors
def index(
    paths: Annotated[list[Path], typer.Argument(help="Image folders or files to index")],
    db: Annotated[Path, typer.Option("--db", help="Collection directory (created if missing)")],
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = "none",
    checkpoint: CheckpointOpt = None,
    seed: SeedOpt = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Decoding processes")] = 1,
    commit_every: Annotated[
        int, typer.Option("--commit-every", min=1, help="Images per commit at most")
    ] = 512,
    commit_seconds: Annotated[
        float, typer.Option("--commit-seconds", min=0.0, help="Commit at least this often (seconds of work)")
    ] = 2.0,
    watch: Annotated[
        bool, typer.Option("--watch", help="After indexing, follow the folders' changes until Ctrl-C/SIGTERM")
    ] = False,
    reembed: Annotated[
        bool, typer.Option("--reembed", help="Re-embed everything (e.g. with another model)")
    ] = False,
    device: DeviceOpt = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar")] = False,
) -> None:
    """Embed the images under PATHS into the collection --db: incremental and resumable."""
    from retrieval.config import IndexRunConfig

    run = IndexRunConfig(
        batch_size=batch_size,
        workers=workers,
        commit_every=commit_every,
        commit_seconds=commit_seconds,
        reembed=reembed,
    )
    cfg = encoder_config(model, pretrained, checkpoint, seed, device)
    report = output.json_line if json_out else output.print_index_summary
    if watch:
        from retrieval.pipelines.watch import watch_folder

        last = watch_folder(
            [str(p) for p in paths], db, cfg, run, progress=not quiet, report=report, ready=output.watching
        )
        typer.echo(f"stopped watching: {last.total} images in {db}, every change committed", err=True)
        return
    from retrieval.pipelines.index_folder import index_folder

    report(index_folder([str(p) for p in paths], db, cfg, run, progress=not quiet))


@app.command()
@handle_errors
def search(
    query: Annotated[
        str | None, typer.Argument(help='Text; arithmetic like "dog + beach - night", "2:beach"')
    ] = None,
    db: Annotated[Path, typer.Option("--db", help="Collection directory")] = Path("collection"),
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Number of results")] = 10,
    image: Annotated[
        Path | None, typer.Option("--image", help="Search by this image (adds to the text)")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="JSON list on stdout, nothing else")] = False,
    html: Annotated[Path | None, typer.Option("--html", help="Write an HTML contact sheet here")] = None,
    rerank: Annotated[
        int,
        typer.Option("--rerank", min=0, help="Re-order the top K by the checkpoint's ITM head (0: off)"),
    ] = 0,
    model: Annotated[str | None, typer.Option("--model", help="Must be the collection's model")] = None,
    pretrained: PretrainedOpt = "none",
    checkpoint: CheckpointOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Find images in a collection by text, by image, or both."""
    from retrieval.pipelines import search as search_pipeline

    cfg = None
    if model or checkpoint:
        cfg = encoder_config(model or "ViT-B-32", pretrained, checkpoint, seed, device)
    hits = search_pipeline.search(db, query, str(image) if image else None, k, cfg, device, rerank)
    if html:
        from retrieval.pipelines.contact_sheet import write_contact_sheet

        write_contact_sheet(html, query or str(image), hits)
        typer.echo(f"wrote {html}", err=True)
    if json_out:
        typer.echo(json.dumps([output.hit_dict(h) for h in hits]))
    else:
        output.print_hits(hits)


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()

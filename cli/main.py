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

from cli import ask as ask_cmd
from cli import caption as caption_cmds
from cli import collection, data, output
from cli import serve as serve_cmd
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
app.command(name="serve")(serve_cmd.serve)
app.command(name="caption")(caption_cmds.caption)
app.command(name="bootstrap")(caption_cmds.bootstrap)
app.command(name="capfilt")(caption_cmds.capfilt)
app.command(name="ask")(ask_cmd.ask)
app.command(name="info")(collection.info)
app.command(name="export")(collection.export)
app.command(name="dedup")(collection.dedup)


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="OpenCLIP architecture, e.g. ViT-B-32, or a preset [default: the collection's, else ViT-B-32]",
    ),
]
PretrainedOpt = Annotated[
    str | None,
    typer.Option(
        "--pretrained",
        help="OpenCLIP pretrained tag, a local weights file, or 'none' (random weights, explicitly) "
        "[default: the collection's, else laion2b_s34b_b79k]",
    ),
]
CheckpointOpt = Annotated[
    Path | None, typer.Option("--checkpoint", help="A checkpoint directory of this toolkit")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N]")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of random init (with --pretrained none)")]
IndexSeedOpt = Annotated[
    int | None, typer.Option("--seed", help="Seed of random init (with --pretrained none) [default: 0]")
]


@app.command()
@handle_errors
def index(
    paths: Annotated[list[Path] | None, typer.Argument(help="Image folders or files to index")] = None,
    db: Annotated[Path, typer.Option("--db", help="Collection directory (created if missing)")] = Path(
        "collection"
    ),
    embeddings: Annotated[
        Path | None,
        typer.Option("--embeddings", help="Import precomputed vectors: img_emb/ + metadata/, or parquet"),
    ] = None,
    max_memory: Annotated[
        str | None, typer.Option("--max-memory", help="RAM the index may take, e.g. 2G (default: 2G)")
    ] = None,
    target_recall: Annotated[
        float | None, typer.Option("--target-recall", help="recall@10 to tune for (default 0.95)")
    ] = None,
    flat_max: Annotated[
        int | None, typer.Option("--flat-max", help="Exact search up to this many vectors (default 100000)")
    ] = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    checkpoint: CheckpointOpt = None,
    seed: IndexSeedOpt = None,
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
    from retrieval.pipelines.model_choice import index_encoder

    run = IndexRunConfig(
        batch_size=batch_size,
        workers=workers,
        commit_every=commit_every,
        commit_seconds=commit_seconds,
        reembed=reembed,
        max_memory=collection.parse_bytes(max_memory),
        target_recall=target_recall,
        flat_max=flat_max,
    )
    cfg = index_encoder(db, model, pretrained, str(checkpoint) if checkpoint else None, seed, device)
    if not quiet:
        collection.show_index_progress()
    if embeddings is not None:
        from retrieval.pipelines.embeddings_io import import_embeddings

        summary = import_embeddings(embeddings, db, cfg, run, progress=not quiet)
        if json_out:
            typer.echo(json.dumps(output.summary_dict(summary)))
        else:
            output.print_import(summary)
        return
    if not paths:
        raise typer.BadParameter("give image folders or files, or --embeddings DIR")
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
    pretrained: PretrainedOpt = None,
    checkpoint: CheckpointOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    vectors: Annotated[
        Path | None, typer.Option("--vectors", help="A .npy of query vectors (Q, dim): one result list each")
    ] = None,
    unique: Annotated[bool, typer.Option("--unique", help="One hit per group of near-duplicates")] = False,
    threshold: Annotated[
        float, typer.Option("--threshold", help="Cosine that makes two hits one (--unique)")
    ] = 0.95,
) -> None:
    """Find images in a collection by text, by image, or both (through `retrieval serve` when one runs); or
    answer a batch of query vectors."""
    if vectors is not None:
        from retrieval.pipelines.collection_tools import search_vectors

        results = search_vectors(db, vectors, k, threshold if unique else None)
        if json_out:
            typer.echo(json.dumps([[output.hit_dict(h) for h in hits] for hits in results]))
        else:
            for hits in results:
                output.print_hits(hits)
        return
    hits = None
    if model is None and pretrained is None and checkpoint is None and not rerank and not unique:
        hits = _search_on_server(db, query, str(image) if image else None, k)
    own_model = model is None and pretrained is None and checkpoint is None
    if hits is None and own_model and query and image is None and not rerank and device in ("auto", "cpu"):
        from retrieval.pipelines.query import text_search

        # the collection's own text tower in numpy, when cached: no torch, open_clip or image tower to load
        hits = text_search(db, query, k, threshold if unique else None)
    if hits is None:
        from retrieval.pipelines import search as search_pipeline
        from retrieval.pipelines.model_choice import search_encoder

        cfg = search_encoder(db, model, pretrained, str(checkpoint) if checkpoint else None, seed, device)
        hits = search_pipeline.search(
            db, query, str(image) if image else None, k, cfg, device, rerank, threshold if unique else None
        )
    if html:
        from retrieval.pipelines.contact_sheet import write_contact_sheet

        write_contact_sheet(html, query or str(image), hits)
        typer.echo(f"wrote {html}", err=True)
    if json_out:
        typer.echo(json.dumps([output.hit_dict(h) for h in hits]))
    else:
        output.print_hits(hits)


def _search_on_server(db: Path, query: str | None, image: str | None, k: int) -> list | None:
    """Hits from a running `retrieval serve` of this collection; None when there is none (or it went away)."""
    from retrieval.serve import client, discovery

    url = discovery.find(db)
    if url is None:
        return None
    try:
        return client.search(url, query, image, k, rerank=0)
    except client.ServerUnavailable as e:
        typer.echo(f"note: the server at {url} did not answer ({e}); searching in-process", err=True)
        return None


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()

"""`retrieval info`, `export` and `dedup`: a collection's card, its vectors out, its near-duplicates."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from cli import output
from cli.errors import handle_errors

DbOpt = Annotated[Path, typer.Option("--db", help="Collection directory")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON on stdout, nothing else")]
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def show_index_progress() -> None:
    """The index build's phases on stderr, one line each (it can take minutes at millions of vectors)."""
    import logging

    logger = logging.getLogger("indexes")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def parse_bytes(text: str | None) -> int | None:
    """'2G', '512M', '1.5GiB', '1000000' -> bytes (powers of 1024)."""
    if text is None:
        return None
    match = _SIZE.match(text)
    if not match:
        raise typer.BadParameter(f"{text!r}: a size like 2G, 512M or 1500000000")
    power = " kmgt".index(match.group(2).lower() or " ")
    return int(float(match.group(1)) * 1024**power)


@handle_errors
def info(db: DbOpt, json_out: JsonOpt = False) -> None:
    """The collection's model, rows and index card (what was measured when the index was built)."""
    from retrieval.pipelines.collection_tools import info as collection_info

    report = collection_info(db)
    if json_out:
        typer.echo(json.dumps(report))
    else:
        output.print_info(report)


@handle_errors
def export(
    db: DbOpt,
    out: Annotated[
        Path, typer.Option("--out", help="Parquet file to write (id, path, meta, embedding)")
    ] = Path("embeddings.parquet"),
) -> None:
    """Write every vector and its metadata to one parquet file (an `embedding` column, as --embeddings reads)."""
    from retrieval.pipelines.embeddings_io import export_collection

    rows = export_collection(db, out)
    typer.echo(f"wrote {rows} rows to {out}", err=True)


@handle_errors
def dedup(
    db: DbOpt,
    threshold: Annotated[
        float, typer.Option("--threshold", help="Cosine similarity that makes two images one")
    ] = 0.95,
    json_out: JsonOpt = False,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the groups here as JSON")] = None,
) -> None:
    """Group near-identical images (range search on the embeddings)."""
    from retrieval.pipelines.collection_tools import dedup as find_groups

    groups = [[_member(r) for r in g] for g in find_groups(db, threshold)]
    if out is not None:
        out.write_text(json.dumps(groups, indent=1))
    if json_out:
        typer.echo(json.dumps(groups))
        return
    for group in groups:
        output.out.print(f"{len(group)} near-identical:", highlight=False)
        for member in group:
            output.out.print(f"  {member['path']}", markup=False, highlight=False)
    typer.echo(f"{len(groups)} group(s), {sum(len(g) - 1 for g in groups)} redundant image(s)", err=True)


def _member(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("path", "width", "height", "size") if row.get(k) is not None}

"""`retrieval serve`: thin. Parse arguments, build the config, run the server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.errors import handle_errors


@handle_errors
def serve(
    db: Annotated[Path, typer.Option("--db", help="Collection directory")],
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="The collection's checkpoint (for --rerank)")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Listen address; 0.0.0.0 exposes the collection")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="0: any free port")] = 8765,
    rerank: Annotated[
        int, typer.Option("--rerank", min=0, help="Re-rank the top K of plain text queries by ITM (0: off)")
    ] = 0,
    max_k: Annotated[int, typer.Option("--max-k", min=1, help="Most results one query may ask for")] = 200,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N]")] = "auto",
) -> None:
    """Serve a collection over HTTP: search API, thumbnails, web page; models loaded once."""
    from retrieval.config import EncoderConfig
    from retrieval.serve.config import ServeConfig
    from retrieval.serve.server import serve as run

    cfg = ServeConfig(host=host, port=port, rerank=rerank, max_k=max_k)
    encoder = EncoderConfig(checkpoint=str(checkpoint), device=device) if checkpoint else None
    run(db, cfg, encoder)

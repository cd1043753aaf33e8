"""The server's one config dataclass: every bound a request can hit, with its default and why."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # localhost only unless told otherwise: the collection's file names are private
    port: int = 8765  # 0: any free port (tests); the port taken is written to the collection's server.json
    max_k: int = 200  # results per query: a page of thumbnails, never the whole collection in one answer
    max_body_bytes: int = 16 * 1024 * 1024  # uploads: a phone photo is 3-12 MB; larger is refused with 413
    max_upload_pixels: int = 40_000_000  # 40 MP: above any camera; past it decoding costs seconds and GBs
    max_query_chars: int = 1000  # text queries: a sentence or an arithmetic of a few terms
    max_batch: int = 64  # queries per model call: what piles up while the model runs goes in one forward pass
    batch_wait_ms: float = 1.0  # how long a lone query waits for company: under load batches fill anyway
    rerank: int = 0  # re-rank the top K of plain text queries with the checkpoint's ITM head (0: off)
    thumb_px: int = 192  # thumbnail's longest side
    thumb_cache: int = 2048  # thumbnails kept in memory (~10 KB each as JPEG)

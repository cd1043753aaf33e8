"""The HTTP API and web page over an Engine (FastAPI). Read-only, bounded, and safe by default:

GET  /search?q=TEXT&k=N            text or arithmetic ("dog + beach - night", "2:beach"), a JSON list of hits
POST /search (multipart image, q)  by an uploaded image, plus the text terms in q if any
POST /search/vector {"vector", k}  by a client's own vector
GET  /neighbours?id=N&k=K          the images nearest one in the collection
GET  /item?id=N                    one image's details; GET /thumbnail?id=N or ?path=PATH: a JPEG thumbnail
GET  /healthz, /metrics, /openapi.json, /  (the web page)

A thumbnail is served only for a row of the collection, found by id or by the exact path of a row: a path
that is not in the collection is 404 whatever it names, so nothing else on the disk can be read.
"""

from __future__ import annotations

import io
import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel

from indexes.paths import display, json_dumps, json_fields
from indexes.store import path_id
from retrieval.data.images import ImageDecodeError, decode_image, load_for_model
from retrieval.errors import UserError
from retrieval.pipelines.rerank import rerank_text
from retrieval.pipelines.search import parse_query
from retrieval.serve.batcher import MicroBatcher
from retrieval.serve.engine import Engine, SearchQuery, public_hit
from retrieval.serve.metrics import Metrics

STATIC = Path(__file__).parent / "static"
RowId = Annotated[int, Query(ge=0, le=2**63 - 1, description="A row id from a search answer")]  # int64 ids


class SafeJSON(JSONResponse):
    """JSON whose text survives any file name: lone surrogates become \\udcXX escapes (indexes/paths.py)."""

    def render(self, content: Any) -> bytes:
        return json_dumps(content).encode("ascii")


class VectorQuery(BaseModel):
    vector: list[float]
    k: int = 10


def create_app(engine: Engine, on_start=None, on_stop=None) -> FastAPI:
    cfg = engine.cfg
    batcher = MicroBatcher(engine.answer, cfg.max_batch, cfg.batch_wait_ms)
    metrics = Metrics()

    async def lifespan(_app):
        if on_start:
            on_start()
        yield
        batcher.close()
        if on_stop:
            on_stop()

    app = FastAPI(
        title="retrieval",
        summary="Search an image collection by text, image or vector.",
        default_response_class=SafeJSON,
        docs_url=None,  # the docs page loads its scripts from a CDN; the spec is at /openapi.json
        redoc_url=None,
        lifespan=lifespan,
    )

    @app.middleware("http")
    async def bounds_and_metrics(request: Request, call_next):
        start = time.perf_counter()
        length = request.headers.get("content-length")
        if length and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            response = SafeJSON(
                {"detail": f"request body over {cfg.max_body_bytes} bytes; send a smaller image"}, 413
            )
        else:
            response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.observe(request.method, route, response.status_code, time.perf_counter() - start)
        return response

    @app.exception_handler(UserError)
    async def user_error(_request, exc: UserError):
        return SafeJSON({"detail": str(exc)}, 400)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, exc: RequestValidationError):
        # FastAPI's own handler echoes each bad input back, and one holding NaN cannot be encoded (a 500):
        # name the field and the problem instead
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()]
        return SafeJSON({"detail": detail}, 422)

    def check_k(k: int) -> int:
        if not 1 <= k <= cfg.max_k:
            raise HTTPException(422, f"k={k}: must be between 1 and {cfg.max_k}")
        return k

    def text_terms(q: str | None):
        if q is None or not q.strip():
            return []
        if len(q) > cfg.max_query_chars:
            raise HTTPException(422, f"query of {len(q)} characters; at most {cfg.max_query_chars}")
        return parse_query(q, files=False)

    async def run(query: SearchQuery, rerank_with: str | None = None) -> list[dict[str, Any]]:
        hits = await batcher.submit(query)
        if rerank_with is not None:
            hits = await batcher.run_alone(engine.rerank, hits, rerank_with)
        return [public_hit(h) for h in hits]

    @app.get("/search", summary="Search by text or text arithmetic")
    async def search_text(
        q: Annotated[str, Query(min_length=1, description='Text, or arithmetic: "dog + beach - night"')],
        k: Annotated[int, Query(description="Number of results")] = 10,
        rerank: Annotated[
            bool, Query(description="Re-rank by ITM when the server was started with --rerank")
        ] = True,
    ) -> list[dict[str, Any]]:
        terms = text_terms(q)
        if not terms:
            raise HTTPException(422, "empty query: give some text")
        plain = engine.reranker is not None and rerank and len(terms) == 1 and terms[0].weight == 1.0
        return await run(
            SearchQuery(k=max(check_k(k), cfg.rerank if plain else 0), terms=terms),
            rerank_text(q, None) if plain else None,
        )

    @app.post("/search", summary="Search by an uploaded image (plus optional text terms)")
    async def search_image(
        image: Annotated[UploadFile, File(description="An image file (JPEG, PNG, WebP, ...)")],
        q: Annotated[str | None, Form(description="Text terms added to the image")] = None,
        k: Annotated[int, Form()] = 10,
    ) -> list[dict[str, Any]]:
        check_k(k)
        data = await image.read(cfg.max_body_bytes + 1)
        if len(data) > cfg.max_body_bytes:
            raise HTTPException(413, f"image over {cfg.max_body_bytes} bytes")
        try:
            pixels, _, _ = await run_in_threadpool(
                load_for_model, data, engine.image_size, max_pixels=cfg.max_upload_pixels
            )
        except ImageDecodeError as e:
            raise HTTPException(400, f"image: {e}") from None
        return await run(SearchQuery(k=k, terms=text_terms(q), pixels=pixels))

    @app.post("/search/vector", summary="Search by a query vector of the collection's dimension")
    async def search_vector(body: VectorQuery) -> list[dict[str, Any]]:
        import numpy as np

        with np.errstate(over="ignore"):  # a float beyond float32 becomes inf, refused just below
            vector = np.asarray(body.vector, np.float32)
        if vector.shape != (engine.dim,) or not np.isfinite(vector).all() or not np.any(vector):
            raise HTTPException(422, f"vector: expected {engine.dim} finite numbers, not all zero")
        return await run(SearchQuery(k=check_k(body.k), vector=vector))

    @app.get("/neighbours", summary="The images nearest one in the collection")
    async def neighbours(id: RowId, k: int = 12) -> list[dict[str, Any]]:  # noqa: A002 - the API's name
        found = await batcher.run_alone(engine.neighbours, id, check_k(k))
        if found is None:
            raise HTTPException(404, f"no image with id {id} in the collection")
        return [public_hit(h) for h in found]

    @app.get("/item", summary="One image's details: path, size, dimensions, caption where known")
    async def item(id: RowId) -> dict[str, Any]:  # noqa: A002
        row = await run_in_threadpool(engine.row, id)
        if row is None:
            raise HTTPException(404, f"no image with id {id} in the collection")
        meta = json.loads(row.get("meta") or "{}")
        keys = ("size", "width", "height")
        return {
            **json_fields(row["path"]),
            "display": display(row["path"]),
            **{k: row[k] for k in keys},
            "id": str(row["id"]),
            "caption": meta.get("caption"),
        }

    @lru_cache(maxsize=cfg.thumb_cache)
    def thumbnail_bytes(image_id: int) -> bytes | None:
        row = engine.row(image_id)
        if row is None:
            return None
        img = decode_image(row["path"], target_size=cfg.thumb_px)
        img.thumbnail((cfg.thumb_px, cfg.thumb_px))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        return buf.getvalue()

    @app.get("/thumbnail", summary="A JPEG thumbnail of an image of the collection (by id or exact path)")
    async def thumbnail(id: RowId | None = None, path: str | None = None) -> Response:  # noqa: A002
        if (id is None) == (path is None):
            raise HTTPException(422, "give exactly one of id or path")
        image_id = id if id is not None else path_id(path)
        if path is not None:  # the path must be exactly a row's: ids are hashes, so check the row itself
            row = await run_in_threadpool(engine.row, image_id)
            if row is None or row["path"] != path:
                raise HTTPException(404, "not an image of this collection")
        try:
            data = await run_in_threadpool(thumbnail_bytes, image_id)
        except (ImageDecodeError, OSError):
            raise HTTPException(410, "the image file can no longer be read") from None
        if data is None:
            raise HTTPException(404, "not an image of this collection")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/healthz", summary="Liveness, the collection's size and model")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", **engine.describe()}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus() -> str:
        gauges = {"model_calls_total": batcher.calls, "batched_queries_total": batcher.items}
        return metrics.render(gauges)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app

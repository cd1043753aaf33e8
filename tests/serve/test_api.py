"""The HTTP API through a real client over a real socket: answers, bounds, path escapes, bad uploads."""

import io
import json
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from indexes.store import ImageStore, path_id


def png_bytes(color=(200, 30, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width=60_000, height=60_000) -> bytes:
    """A tiny file whose header claims 3.6 billion pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_text_search_answers_paths_and_scores(http, collection):
    response = http.get("/search", params={"q": "a red square + 2:blue - night", "k": 5})
    assert response.status_code == 200
    hits = response.json()
    assert len(hits) == 5 and all({"path", "score", "id"} <= set(h) for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert {os.fsencode(h["path"]) for h in hits} <= {os.fsencode(p) for p in collection.paths}


def test_image_upload_and_vector_queries_find_the_image(http, collection):
    target = collection.paths[3]
    with open(target, "rb") as f:
        hits = http.post("/search", files={"image": ("q.png", f.read())}, data={"k": "3"}).json()
    assert hits[0]["path"] == target and hits[0]["score"] > 0.999

    row = ImageStore(collection.db).fetch([path_id(target)], vectors=True)[path_id(target)]
    by_vector = http.post("/search/vector", json={"vector": list(map(float, row["vector"])), "k": 2}).json()
    assert by_vector[0]["path"] == target

    near = http.get("/neighbours", params={"id": path_id(target), "k": 4}).json()
    assert len(near) == 4 and target not in {h["path"] for h in near}


def test_any_file_name_comes_back_exactly(http, collection):
    hits = http.get("/search", params={"q": "anything", "k": 200}).json()
    names = {os.fsencode(h["path"]) for h in hits}
    assert names == {os.fsencode(p) for p in collection.paths}
    odd = next(h for h in hits if "path_bytes" in h)
    item = http.get("/item", params={"id": odd["id"]}).json()
    assert item["display"].endswith("bad\\xff\\xfename.png")
    assert http.get("/thumbnail", params={"id": odd["id"]}).status_code == 200


def test_thumbnails_only_of_the_collection(http, collection):
    inside = collection.paths[0]
    ok = http.get("/thumbnail", params={"path": inside})
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/jpeg"
    Image.open(io.BytesIO(ok.content)).verify()

    stranger = collection.folder / "not_indexed.png"  # a real image file, but not a row of the collection
    stranger.write_bytes(png_bytes())
    for path in (
        "/etc/passwd",
        str(collection.folder / ".." / "db" / "manifest.json"),
        inside + "/../../../../etc/passwd",
        os.path.dirname(inside) + "/../set1/" + os.path.basename(inside),
        str(stranger),
        "",
    ):
        response = http.get("/thumbnail", params={"path": path})
        assert response.status_code in (404, 422), path
    assert http.get("/thumbnail", params={"id": 12345}).status_code == 404
    assert http.get("/thumbnail").status_code == 422
    assert http.get("/thumbnail/../manifest.json").status_code == 404


def test_bad_uploads_get_4xx_with_a_one_line_reason(http):
    cases = {
        "not an image": (b"this is plain text, not pixels", 400),
        "bomb": (bomb_png(), 400),
        "truncated": (png_bytes()[:60], 400),
        "empty": (b"", 400),
    }
    for name, (data, status) in cases.items():
        response = http.post("/search", files={"image": ("x.png", data)})
        assert response.status_code == status, (name, response.text)
        detail = response.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail and detail, name
    big = http.post("/search", files={"image": ("big.png", b"\0" * (50 * 1024 * 1024))})
    assert big.status_code == 413 and "\n" not in big.json()["detail"]
    assert http.post("/search", data={"k": "3"}).status_code == 422  # no image at all


def test_bounds_on_k_and_query_length(http):
    for k in (0, -1, 10_000):
        assert http.get("/search", params={"q": "x", "k": k}).status_code == 422
    assert http.get("/search", params={"q": "x" * 5000}).status_code == 422
    assert http.get("/search", params={"q": "   "}).status_code == 422
    assert http.post("/search/vector", json={"vector": [1.0, 2.0]}).status_code == 422
    # a term naming a file on the server is text, never read from the server's disk
    assert http.get("/search", params={"q": "/etc/passwd + x"}).status_code == 200


def counters(http) -> dict[str, float]:
    lines = http.get("/metrics").text.splitlines()
    return {
        n: float(v)
        for n, v in (ln.split()[:2] for ln in lines if ln.startswith(("retrieval_b", "retrieval_m")))
    }


def test_concurrent_queries_share_model_calls(http):
    start = counters(http)
    with ThreadPoolExecutor(16) as pool:
        codes = list(
            pool.map(lambda i: http.get("/search", params={"q": f"query {i}", "k": 3}).status_code, range(32))
        )
    assert codes == [200] * 32
    end = counters(http)
    calls = end["retrieval_model_calls_total"] - start["retrieval_model_calls_total"]
    queries = end["retrieval_batched_queries_total"] - start["retrieval_batched_queries_total"]
    assert queries == 32 and calls < 32  # some queries were answered together


def test_health_metrics_and_openapi(http):
    health = http.get("/healthz").json()
    assert health["status"] == "ok" and health["count"] == 27
    text = http.get("/metrics").text
    assert 'retrieval_requests_total{method="GET",route="/healthz",status="200"}' in text
    spec = http.get("/openapi.json").json()
    assert {"/search", "/search/vector", "/thumbnail", "/healthz", "/neighbours"} <= set(spec["paths"])
    assert http.get("/").headers["content-type"].startswith("text/html")
    json.dumps(spec)


def test_served_vectors_match_in_process_search(http, collection):
    from retrieval.pipelines.search import search

    local = search(collection.db, "a red square", k=5, device="cpu")
    served = http.get("/search", params={"q": "a red square", "k": 5}).json()
    assert [h["path"] for h in served] == [h["path"] for h in local]
    assert np.allclose([h["score"] for h in served], [h["score"] for h in local], atol=1e-5)

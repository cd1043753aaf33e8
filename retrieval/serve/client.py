"""`retrieval search` through a running server: the standard library only, so a warm search costs a Python
start and one HTTP round trip, not torch and the model."""

from __future__ import annotations

import json
import mimetypes
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

from retrieval.errors import UserError

TIMEOUT = 60.0  # seconds: a re-ranked query on a busy CPU server can take a few


class ServerUnavailable(Exception):
    """The server went away between discovery and the query: search in-process instead."""


def _multipart(fields: dict[str, str], image: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    with open(image, "rb") as f:
        data = f.read()
    kind = mimetypes.guess_type(image)[0] or "application/octet-stream"
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="query"\r\n'
        f"Content-Type: {kind}\r\n\r\n".encode()
        + data
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def search(url: str, query: str | None, image: str | None, k: int, rerank: int) -> list[dict[str, Any]]:
    """Hits as the in-process search gives them (path, score, ...): the server's JSON form read back."""
    if image is not None:
        if not os.path.isfile(image):
            raise UserError(f"{image}: no such image file")
        fields = {"k": str(k), **({"q": query} if query else {})}
        body, kind = _multipart(fields, image)
        request = urllib.request.Request(f"{url}/search", data=body, headers={"Content-Type": kind})
    else:
        params = {"q": query or "", "k": str(k), "rerank": "true" if rerank else "false"}
        request = urllib.request.Request(f"{url}/search?{urllib.parse.urlencode(params)}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("detail")
        except ValueError:
            detail = e.reason
        if 400 <= e.code < 500:
            raise UserError(f"server at {url}: {detail}") from None
        raise ServerUnavailable(str(detail)) from None
    except OSError as e:
        raise ServerUnavailable(str(e)) from None

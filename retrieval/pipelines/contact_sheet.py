"""An HTML contact sheet of search results: one self-contained file (thumbnails inlined as data URIs), so it
opens from disk in any browser and serves nothing from the filesystem."""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Any

from indexes.paths import display
from retrieval.data.images import ImageDecodeError, decode_image

THUMB = 192  # px, longest side


def _thumbnail(path: str) -> str | None:
    try:
        img = decode_image(path, target_size=THUMB)
    except (ImageDecodeError, OSError):
        return None
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_contact_sheet(path: str | os.PathLike, title: str, hits: list[dict[str, Any]]) -> None:
    cards = []
    for rank, hit in enumerate(hits, 1):
        src = _thumbnail(hit["path"])
        img = f'<img src="{src}" alt="">' if src else '<div class="missing">unreadable</div>'
        name = html.escape(display(os.path.basename(hit["path"])))  # any name, literally (indexes/paths.py)
        full = html.escape(display(hit["path"]))
        cards.append(
            f'<figure title="{full}">{img}<figcaption><b>{rank}.</b> {name}<br>'
            f'<span class="score">{hit["score"]:.4f}</span></figcaption></figure>'
        )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(display(title))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: {THUMB}px; background: #fff; padding: 6px; border: 1px solid #ddd; }}
img, .missing {{ width: {THUMB}px; height: {THUMB}px; object-fit: contain; background: #eee; }}
figcaption {{ font-size: 12px; word-break: break-all; }} .score {{ color: #555; }}
</style></head>
<body><h2>{html.escape(display(title))}</h2><div class="grid">
{chr(10).join(cards)}
</div></body></html>
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)

"""How results look: rich tables for people (stdout for results, stderr for summaries), plain dicts for --json."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from rich.console import Console
from rich.table import Table

out = Console(soft_wrap=True)
err = Console(stderr=True)


def hit_dict(hit: dict[str, Any]) -> dict[str, Any]:
    keys = ("path", "score", "itm", "rerank", "width", "height", "size")
    return {k: hit[k] for k in keys if k in hit}


def print_hits(hits: list[dict[str, Any]]) -> None:
    if not hits:
        err.print("no results (is the collection empty?)")
        return
    table = Table(show_edge=False)
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    itm = any("itm" in h for h in hits)
    if itm:
        table.add_column("itm", justify="right")
    table.add_column("path", overflow="fold")
    for rank, hit in enumerate(hits, 1):
        match = [f"{hit['itm']:.4f}" if "itm" in hit else "-"] if itm else []
        table.add_row(str(rank), f"{hit['score']:.4f}", *match, hit["path"])
    out.print(table)


def summary_dict(summary: Any) -> dict[str, Any]:
    return dataclasses.asdict(summary)


def json_line(summary: Any) -> None:
    print(json.dumps(summary_dict(summary)), flush=True)


def watching() -> None:
    err.print("watching for changes (Ctrl-C or SIGTERM to stop)")


def print_index_summary(s: Any) -> None:
    err.print(
        f"[bold]{s.db}[/bold]: {s.total} images ({s.model}); scanned {s.scanned} in {s.seconds:.1f}s: "
        f"{s.new} new, {s.changed} changed, {s.touched} touched, {s.unchanged} unchanged, {s.removed} removed, "
        f"{len(s.skipped)} skipped"
    )
    if not s.model_loaded:
        err.print("no image needed embedding: the model was not loaded")
    if s.embedded_per_s:
        err.print(f"model throughput {s.embedded_per_s:.1f} img/s")
    if s.index:
        err.print(
            f"index: {s.index.get('type')} over {s.index.get('count')} vectors, "
            f"recall@10 {s.index.get('recall@10')}, built in {s.index.get('build_seconds')}s"
        )
    if s.skipped:
        err.print(f"[yellow]skipped {len(s.skipped)} file(s):[/yellow]")
        for path, reason in list(s.skipped.items())[:50]:
            err.print(f"  {path}: {reason}", markup=False, highlight=False)
        if len(s.skipped) > 50:
            err.print(f"  ... and {len(s.skipped) - 50} more (use --json for the full list)")


def print_metrics(result: dict[str, Any]) -> None:
    table = Table(show_edge=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)

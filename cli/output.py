"""How results look: rich tables for people (stdout for results, stderr for summaries), plain dicts for --json."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from indexes.paths import display, json_fields

out = Console(soft_wrap=True)
err = Console(stderr=True)


def hit_dict(hit: dict[str, Any]) -> dict[str, Any]:
    """The --json form of a hit: the name in its reversible JSON form (indexes/paths.py), then the figures."""
    keys = ("score", "itm", "rerank", "width", "height", "size")
    return {**json_fields(hit["path"]), **{k: hit[k] for k in keys if k in hit}}


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
        # Text, not a str: a name like "x[bold]y.png" is shown as it is, never read as rich markup
        table.add_row(str(rank), f"{hit['score']:.4f}", *match, Text(display(hit["path"])))
    out.print(table)


def summary_dict(summary: Any) -> dict[str, Any]:
    return dataclasses.asdict(summary)


def json_line(summary: Any) -> None:
    print(json.dumps(summary_dict(summary)), flush=True)


def watching() -> None:
    err.print("watching for changes (Ctrl-C or SIGTERM to stop)")


def print_index_summary(s: Any) -> None:
    err.print(
        f"[bold]{escape(display(s.db))}[/bold]: {s.total} images ({escape(s.model)}); scanned {s.scanned} in {s.seconds:.1f}s: "
        f"{s.new} new, {s.changed} changed, {s.touched} touched, {s.unchanged} unchanged, {s.removed} removed, "
        f"{len(s.skipped)} skipped"
    )
    if not s.model_loaded:
        err.print("no image needed embedding: the model was not loaded")
    if s.embedded_per_s:
        err.print(f"model throughput {s.embedded_per_s:.1f} img/s")
    print_index_line(s.index)
    if s.skipped:
        err.print(f"[yellow]skipped {len(s.skipped)} file(s):[/yellow]")
        for path, reason in list(s.skipped.items())[:50]:
            err.print(f"  {display(path)}: {reason}", markup=False, highlight=False)
        if len(s.skipped) > 50:
            err.print(f"  ... and {len(s.skipped) - 50} more (use --json for the full list)")


def print_metrics(result: dict[str, Any]) -> None:
    table = Table(show_edge=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)


def print_info(report: dict[str, Any]) -> None:
    model, card, file = report["model"], report["index"], report["index_file"]
    out.print(
        f"[bold]{report['db']}[/bold]: {report['rows']} rows, {model.get('arch')} ({model.get('weights')}), "
        f"{model.get('embed_dim')}-d"
    )
    if not card:
        out.print("index: none built yet (the next `retrieval index` or search builds it)")
        return
    table = Table(show_edge=False, show_header=False)
    latency = card.get("latency_ms") or {}
    fields = [
        ("index", f"{card.get('type')} ({card.get('factory')}) on the {card.get('device', 'cpu')}"),
        ("vectors", f"{card.get('count')} ({card.get('count_at_build')} at build)"),
        ("search params", json.dumps(card.get("search_params") or {})),
        (
            "recall@10",
            f"{card.get('recall@10')} against exact search, {card.get('recall_queries')} held-out queries "
            f"(target {card.get('target_recall')})",
        ),
        (
            "latency",
            f"p50 {latency.get('p50')} ms, p99 {latency.get('p99')} ms per query; "
            f"{card.get('batch_qps')} queries/s batched",
        ),
        ("build", f"{card.get('build_seconds')} s (training {card.get('train_seconds')} s)"),
        ("size", f"{file.get('bytes_on_disk')} bytes on disk; up to date: {file.get('up_to_date')}"),
    ]
    for key, value in fields:
        table.add_row(key, value)
    out.print(table, markup=False, highlight=False)


def print_index_line(index: dict[str, Any]) -> None:
    if index:
        err.print(
            f"index: {index.get('type')} over {index.get('count')} vectors, "
            f"recall@10 {index.get('recall@10')}, built in {index.get('build_seconds')}s"
        )


def print_import(s: Any) -> None:
    err.print(
        f"[bold]{s.db}[/bold]: {s.total} vectors ({s.model}); {s.imported} imported from "
        f"{s.sources - s.already} file(s) in {s.seconds:.1f}s ({s.already} imported before), "
        f"{s.bad_vectors} unusable vector(s) skipped"
    )
    print_index_line(s.index)

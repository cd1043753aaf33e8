"""The bootstrap's final report: web captions kept and dropped, synthetic captions kept, the threshold, and
histograms of the scores as a PNG (matplotlib, imported only here, Agg backend). Where the input marks its noisy
rows (a `noisy` column, as `data synth --noise` writes), the filter's precision and recall at flagging them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retrieval.pipelines.bootstrap_io import atomic_write


def flag_quality(rows: Sequence[dict[str, Any]]) -> dict[str, float] | None:
    """Precision and recall of 'dropped' as a flag of the rows marked noisy; None without such marks."""
    marked = [r for r in rows if isinstance(r.get("noisy"), bool)]
    if not marked:
        return None
    tp = sum(r["noisy"] and not r["kept"] for r in marked)
    flagged = sum(not r["kept"] for r in marked)
    noisy = sum(r["noisy"] for r in marked)
    return {
        "precision": round(tp / flagged, 4) if flagged else 0.0,
        "recall": round(tp / noisy, 4) if noisy else 0.0,
        "noisy": noisy,
        "flagged": flagged,
    }


def report(out: Path, parts: Sequence[list[dict[str, Any]]], plan: dict[str, Any], stats) -> dict[str, Any]:
    rows = [r["row"] for p in parts for r in p]
    web = [r for r in rows if r["source"] == "web"]
    synth = [r for r in rows if r["source"] == "synthetic"]
    result: dict[str, Any] = {
        "input": plan["input"],
        "format": plan["format"],
        "images": plan["images"],
        "threshold": plan["threshold"],
        "web_kept": sum(r["kept"] for r in web),
        "web_dropped": sum(not r["kept"] for r in web),
        "synthetic_kept": sum(r["kept"] for r in synth),
        "synthetic_dropped": sum(not r["kept"] for r in synth),
        "skipped_input_rows": sum(stats.skipped.values()),
        "captioner": plan["captioner"],
        "filter": plan["filter"],
    }
    quality = flag_quality(web)
    if quality is not None:
        result["noise_flagging"] = quality
    if any(r["score"] is not None for r in rows):
        result["histogram"] = str(out / "scores.png")
        histogram(out / "scores.png", web, synth, plan["threshold"])
    atomic_write(out / "bootstrap.json", json.dumps(result, indent=2).encode())
    return result


def histogram(path: Path, web: Sequence[dict], synth: Sequence[dict], threshold: float | None) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    bins = [i / 40 for i in range(41)]
    series = [
        ("web, kept", [r["score"] for r in web if r["kept"]]),
        ("web, dropped", [r["score"] for r in web if not r["kept"]]),
        ("synthetic", [r["score"] for r in synth]),
    ]
    for label, values in series:
        if values:
            ax.hist(values, bins=bins, alpha=0.55, label=f"{label} ({len(values)})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("ITM match probability")
    ax.set_ylabel("captions")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    atomic_write(path, buf.getvalue())

"""`retrieval train` and `retrieval eval`: thin wrappers over retrieval.train.loop and retrieval.eval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.errors import handle_errors


@handle_errors
def train(
    pairs: Annotated[
        Path, typer.Argument(help="Pairs: JSONL/CSV/TSV/parquet, a folder with .txt sidecars, or tar shards")
    ],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint directory to write")],
    config: Annotated[
        Path | None, typer.Option("--config", help="JSON config file (see retrieval/train/config.py)")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override: key=value, e.g. objectives.negatives=random")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue the run in --out where it stopped, with its own config unless --config"
        ),
    ] = False,
    stop_after: Annotated[
        int | None, typer.Option("--stop-after", min=1, help="Stop after this step (resume later)")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar")] = False,
) -> None:
    """Train an ITC + ITM (ALBEF-style) model on image-text pairs. Multi-process: torchrun -m cli.main train ..."""
    from retrieval.train.config import load_train_config
    from retrieval.train.loop import train as run

    saved = out / "train_config.json"
    if resume and config is None and saved.exists():
        config = saved  # the run's own settings; --set still overrides (e.g. a longer refine.steps)
    cfg = load_train_config(config, set_ or [])
    result = run(str(pairs), out, cfg, resume=resume, progress=not quiet, stop_after=stop_after)
    typer.echo(f"checkpoint: {result['out']} (step {result['steps']})", err=True)


@handle_errors
def evaluate(
    pairs: Annotated[Path, typer.Argument(help="Held-out pairs to evaluate on")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A checkpoint directory trained here")],
    rerank: Annotated[
        int, typer.Option("--rerank", min=0, help="Re-rank the top K with the ITM head (0: off)")
    ] = 0,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Use only the first N images")] = None,
    device: Annotated[str, typer.Option("--device")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="JSON on stdout, nothing else")] = False,
) -> None:
    """Recall@1/5/10 both ways, after ITM re-ranking of the top K, and attribute binding."""
    import open_clip

    from retrieval.eval.evaluate import EvalConfig
    from retrieval.eval.evaluate import evaluate as run
    from retrieval.models.albef import load_albef
    from retrieval.models.encoders import resolve_device
    from retrieval.train.data import load_pairs

    dev = resolve_device(device)
    model, arch = load_albef(checkpoint)
    model = model.to(dev)
    cfg = model.clip.visual.preprocess_cfg
    size = model.clip.visual.image_size
    result = run(
        model,
        load_pairs(pairs),
        EvalConfig(rerank_k=rerank, limit=limit),
        image_size=int(size[0] if isinstance(size, (tuple, list)) else size),
        mean=cfg["mean"],
        std=cfg["std"],
        tokenizer=open_clip.get_tokenizer(arch),
        device=dev,
    )
    if json_out:
        typer.echo(json.dumps(result))
    else:
        from cli.output import print_metrics

        print_metrics(result)

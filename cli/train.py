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
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="itc_itm (the retrieval model, the default), caption (the captioner, objective lm) or vlm "
            "(a connector + causal LLM that answers questions, retrieval/train/vlm.py)",
        ),
    ] = None,
    vision: Annotated[
        str | None,
        typer.Option("--vision", help="--task vlm: vision tower, a checkpoint DIR or an OpenCLIP ARCH[:TAG]"),
    ] = None,
) -> None:
    """Train an ITC + ITM (ALBEF-style) model on image-text pairs, a captioner (--task caption), or (--task vlm)
    a VLM's connector on image + caption / question + answer rows. Multi-process: torchrun -m cli.main train ..."""
    if task == "vlm":
        _train_vlm(pairs, out, config, set_ or [], resume, stop_after, quiet, vision)
        return
    task = {"lm": "caption", "retrieval": "itc_itm"}.get(task, task) if task else None
    from retrieval.train.config import load_train_config
    from retrieval.train.loop import train as run

    saved = out / "train_config.json"
    if resume and config is None and saved.exists():
        config = saved  # the run's own settings; --set still overrides (e.g. a longer refine.steps)
    overrides = [f"task={task}"] if task else []
    cfg = load_train_config(config, [*overrides, *(set_ or [])])
    result = run(str(pairs), out, cfg, resume=resume, progress=not quiet, stop_after=stop_after)
    typer.echo(f"checkpoint: {result['out']} (step {result['steps']})", err=True)


def _train_vlm(data: Path, out: Path, config, overrides, resume, stop_after, quiet, vision) -> None:
    from retrieval.train.vlm import train_vlm
    from retrieval.train.vlm_config import load_vlm_config

    saved = out / "train_config.json"
    if resume and config is None and saved.exists():
        config = saved  # the run's own settings; --set still overrides
    cfg = load_vlm_config(config, overrides)
    result = train_vlm(str(data), out, vision, cfg, resume=resume, progress=not quiet, stop_after=stop_after)
    typer.echo(f"checkpoint: {result['out']} (step {result['steps']})", err=True)


@handle_errors
def evaluate(
    pairs: Annotated[Path | None, typer.Argument(help="Held-out pairs to evaluate recall on")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="A checkpoint directory trained here")
    ] = None,
    rerank: Annotated[
        int, typer.Option("--rerank", min=0, help="Re-rank the top K with the ITM head (0: off)")
    ] = 0,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Use only the first N images")] = None,
    binding: Annotated[
        Path | None,
        typer.Option("--binding", help="Image + caption + negative caption triples (SugarCrepe/ARO layout)"),
    ] = None,
    binding_images: Annotated[
        Path | None, typer.Option("--binding-images", help="Folder the triples' image paths are relative to")
    ] = None,
    zero_shot: Annotated[
        Path | None, typer.Option("--zero-shot", help="Folder with one subfolder of images per class")
    ] = None,
    templates: Annotated[
        str, typer.Option("--templates", help="Zero-shot prompts: openai, simple, plain, or a file with {c}")
    ] = "openai",
    vqa: Annotated[
        Path | None,
        typer.Option(
            "--vqa", help="Image + question + answer rows: exact-match accuracy of a VLM checkpoint"
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="JSON on stdout, nothing else")] = False,
    captioner: Annotated[
        Path | None,
        typer.Option(
            "--captioner", help="A captioner checkpoint: BLEU-4, CIDEr and synth correctness on PAIRS"
        ),
    ] = None,
) -> None:
    """Recall@1/5/10 both ways, after ITM re-ranking of the top K, attribute binding, zero-shot accuracy;
    caption metrics with --captioner."""
    from retrieval.errors import UserError

    captions: dict = {}
    if captioner is not None:
        from cli.caption import caption_metrics

        captions = caption_metrics(pairs, captioner, limit, device)
        if checkpoint is None:
            _print(captions, json_out)
            return
    if checkpoint is None:
        raise UserError("eval needs --checkpoint DIR, a checkpoint trained with `retrieval train`")
    if vqa is not None:
        from retrieval.eval.vqa import evaluate_vqa
        from retrieval.models.vlm_checkpoint import load_vlm

        result = evaluate_vqa(load_vlm(checkpoint), vqa, limit=limit, progress=not json_out)
        if json_out:
            typer.echo(json.dumps(result))
        else:
            typer.echo(f"VQA exact match {result['accuracy']:.3f} over {result['n']} questions")
            for kind, acc in result["per_kind"].items():
                typer.echo(f"  {kind:10s} {acc:.3f}")
        return
    from retrieval.eval.binding import BindingConfig
    from retrieval.eval.evaluate import EvalConfig
    from retrieval.eval.suite import SuiteConfig, evaluate_checkpoint
    from retrieval.eval.zeroshot import ZeroShotConfig

    cfg = SuiteConfig(
        pairs=str(pairs) if pairs else None,
        binding=str(binding) if binding else None,
        zero_shot=str(zero_shot) if zero_shot else None,
        device=device,
        recall=EvalConfig(rerank_k=rerank, limit=limit),
        triples=BindingConfig(images_root=str(binding_images) if binding_images else None),
        classes=ZeroShotConfig(templates=templates),
    )
    result = evaluate_checkpoint(checkpoint, cfg)
    _print({**result, **captions}, json_out)


def _print(result: dict, json_out: bool) -> None:
    if json_out:
        typer.echo(json.dumps(result))
    else:
        from cli.output import print_metrics

        print_metrics(result)

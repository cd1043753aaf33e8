"""`retrieval caption`, `retrieval bootstrap`, `retrieval capfilt` and eval's caption metrics: thin wrappers over
retrieval.pipelines.caption, .bootstrap and .capfilt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.errors import handle_errors


def _gen(beams: int, top_p: float, temperature: float, min_len: int, max_len: int, seed: int):
    from retrieval.errors import UserError
    from retrieval.models.generate import GenerateConfig

    if beams > 1 and top_p > 0:
        raise UserError("--beams and --top-p exclude each other: beam search, or nucleus sampling")
    if not 0 <= top_p <= 1 or temperature <= 0 or min_len > max_len:
        raise UserError(
            f"--top-p {top_p}, --temperature {temperature}, --min-len {min_len}, --max-len {max_len}: "
            "need top-p in [0, 1], temperature > 0, min-len <= max-len"
        )
    return GenerateConfig(
        beams=beams, top_p=top_p, temperature=temperature, min_len=min_len, max_len=max_len, seed=seed
    )


@handle_errors
def caption(
    paths: Annotated[list[Path], typer.Argument(help="Images or folders of images")],
    checkpoint: Annotated[
        Path, typer.Option("--checkpoint", help="A captioner checkpoint (train --task caption)")
    ],
    json_out: Annotated[
        bool, typer.Option("--json", help="JSON on stdout: a list of {path, caption}")
    ] = False,
    beams: Annotated[int, typer.Option("--beams", min=1, help="Beam search with N beams (1: greedy)")] = 1,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling with this top-p (0: off)")] = 0.0,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature")] = 1.0,
    min_len: Annotated[int, typer.Option("--min-len", min=0, help="Words at least")] = 1,
    max_len: Annotated[int, typer.Option("--max-len", min=1, help="Words at most")] = 20,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampling draws")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N]")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar")] = False,
) -> None:
    """Caption images or whole folders with a captioner checkpoint."""
    from retrieval.data.scan import scan_images
    from retrieval.errors import UserError
    from retrieval.models.captioner import load_captioner
    from retrieval.models.encoders import resolve_device
    from retrieval.pipelines.caption import caption_files

    gen = _gen(beams, top_p, temperature, min_len, max_len, seed)
    model, _, _ = load_captioner(checkpoint)
    files = [e.path for e in scan_images(paths)]
    if not files:
        raise UserError(f"no images under {', '.join(map(str, paths))}")
    results = caption_files(model, files, gen, resolve_device(device), batch_size, progress=not quiet)
    if json_out:
        typer.echo(
            json.dumps(
                [
                    {"path": r.path, "caption": r.caption, **({"error": r.error} if r.error else {})}
                    for r in results
                ]
            )
        )
        return
    for r in results:
        typer.echo(f"{r.path}\t{r.caption if r.caption is not None else '(' + str(r.error) + ')'}")


def caption_metrics(pairs: Path | None, captioner: Path, limit: int | None, device: str) -> dict:
    """`eval --captioner`: BLEU-4, CIDEr-D and synth correctness of greedy captions on PAIRS."""
    from retrieval.errors import UserError
    from retrieval.eval.captions import evaluate_captioner
    from retrieval.models.captioner import load_captioner
    from retrieval.models.encoders import resolve_device

    if pairs is None:
        raise UserError("eval --captioner needs PAIRS: the images to caption and their reference captions")
    model, _, _ = load_captioner(captioner)
    return evaluate_captioner(model, str(pairs), limit=limit, device=resolve_device(device), progress=True)


@handle_errors
def bootstrap(
    pairs: Annotated[
        Path, typer.Argument(help="Pairs to bootstrap: JSONL/CSV/TSV/parquet or WebDataset tars")
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory for the bootstrapped dataset and its report")],
    captioner: Annotated[
        Path | None, typer.Option("--captioner", help="Captioner checkpoint (none: web captions only)")
    ] = None,
    filter_: Annotated[
        Path | None, typer.Option("--filter", help="Checkpoint with an ITM head (none: keep everything)")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="Keep captions with ITM >= this [default: calibrated]")
    ] = None,
    samples: Annotated[int, typer.Option("--samples", min=0, help="Synthetic captions per image")] = 3,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling top-p")] = 0.9,
    shard_images: Annotated[int, typer.Option("--shard-images", min=1, help="Images per shard")] = 256,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N]")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="The report as JSON on stdout")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar")] = False,
) -> None:
    """CapFilt: score web captions with the filter, add the captioner's synthetic captions, keep what passes.
    Resumable: a re-run skips finished shards."""
    from retrieval.errors import UserError
    from retrieval.pipelines.bootstrap import BootstrapConfig
    from retrieval.pipelines.bootstrap import bootstrap as run

    if captioner is None and filter_ is None:
        raise UserError("bootstrap needs --captioner, --filter or both")
    if threshold is not None and not 0 <= threshold <= 1:
        raise UserError(f"--threshold {threshold}: an ITM probability in [0, 1]")
    cfg = BootstrapConfig(
        samples=samples, threshold=threshold, top_p=top_p, shard_images=shard_images, seed=seed, device=device
    )
    report = run(
        str(pairs),
        out,
        str(captioner) if captioner else None,
        str(filter_) if filter_ else None,
        cfg,
        progress=not quiet,
    )
    if json_out:
        typer.echo(json.dumps(report))
        return
    typer.echo(
        f"{out}: web captions kept {report['web_kept']}, dropped {report['web_dropped']}; synthetic kept "
        f"{report['synthetic_kept']} (threshold {report['threshold']})",
        err=True,
    )


@handle_errors
def capfilt(
    noisy: Annotated[Path, typer.Argument(help="The noisy (web) pairs to clean")],
    clean: Annotated[Path, typer.Option("--clean", help="A small clean pairs set to fine-tune on")],
    out: Annotated[Path, typer.Option("--out", help="Directory for every stage's output (resumable)")],
    eval_pairs: Annotated[
        Path | None, typer.Option("--eval", help="Held-out pairs: recall and caption metrics in the report")
    ] = None,
    arch: Annotated[str, typer.Option("--arch", help="Architecture of the trained models")] = "tiny-cvit-64",
    image_weights: Annotated[
        Path | None,
        typer.Option("--image-weights", help="Pretrained image trunk for --arch (model.image_weights)"),
    ] = None,
    steps: Annotated[
        int, typer.Option("--steps", min=1, help="ITC steps of the pretrained and final models")
    ] = 300,
    refine_steps: Annotated[
        int, typer.Option("--refine-steps", min=1, help="Their ITM refinement steps")
    ] = 200,
    filter_steps: Annotated[
        int, typer.Option("--filter-steps", min=1, help="Filter fine-tuning steps")
    ] = 150,
    captioner_steps: Annotated[int, typer.Option("--captioner-steps", min=1)] = 300,
    samples: Annotated[int, typer.Option("--samples", min=0, help="Synthetic captions per image")] = 2,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="Filter threshold [default: calibrated on --clean]")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="key=value for every retrieval training stage")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N]")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="The report as JSON on stdout")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars")] = False,
) -> None:
    """The whole BLIP CapFilt loop: pretrain on the noisy pairs, fine-tune a filter and a captioner on the clean
    set, bootstrap the noisy set, train a fresh model on it and evaluate. Re-run to resume."""
    from retrieval.pipelines.bootstrap import BootstrapConfig
    from retrieval.pipelines.capfilt import CapfiltConfig, check_inputs
    from retrieval.pipelines.capfilt import capfilt as run

    check_inputs(str(noisy), str(clean))
    cfg = CapfiltConfig(
        arch=arch,
        image_weights=str(image_weights) if image_weights else "",
        pretrain_steps=steps,
        pretrain_refine=refine_steps,
        filter_steps=filter_steps,
        filter_refine=filter_steps,
        captioner_steps=captioner_steps,
        bootstrap=BootstrapConfig(samples=samples, threshold=threshold, seed=seed, device=device),
        eval_pairs=str(eval_pairs) if eval_pairs else None,
        overrides=tuple(set_ or []),
        seed=seed,
    )
    report = run(str(noisy), str(clean), out, cfg, progress=not quiet)
    if json_out:
        typer.echo(json.dumps(report))
        return
    b = report["bootstrap"]
    typer.echo(
        f"{out}: web kept {b['web_kept']}, dropped {b['web_dropped']}, synthetic kept "
        f"{b['synthetic_kept']}; {report['cpu_s']} CPU-s; report in {out / 'report.json'}",
        err=True,
    )

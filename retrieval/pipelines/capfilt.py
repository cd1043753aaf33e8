"""`retrieval capfilt`: BLIP's whole caption bootstrapping loop as one resumable run.

    1 pretrain   an ITC + ITM model on the noisy pairs                      OUT/pretrain/
    2 filter     it, fine-tuned on the clean pairs; its ITM threshold calibrated there and recorded
                                                                            OUT/filter/
    3 captioner  a decoder on the pretrained image tower, both trained on the clean pairs
                 (its own weights: BLIP Table 4, captioner and filter must not share them)
                                                                            OUT/captioner/
    4 bootstrap  the noisy pairs filtered and captioned (pipelines/bootstrap.py)
                                                                            OUT/pairs.*, OUT/dropped.*
    5 model      a fresh model trained on the bootstrapped pairs, the pretrain's budget
                                                                            OUT/model/
    6 evaluate   recall on held-out pairs, the captioner's metrics          OUT/report.json

A stage whose output is complete is skipped; an interrupted training stage resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.errors import UserError
from retrieval.pipelines.bootstrap import BootstrapConfig, bootstrap
from retrieval.pipelines.bootstrap_io import atomic_write, output_names


@dataclass(frozen=True)
class CapfiltConfig:
    arch: str = "tiny-cvit-64"  # of the pretrained and final models (and the captioner's image tower)
    # a pretrained image trunk for arch (model.image_weights) under the two models that start from scratch
    # (pretrain, final); the filter and captioner inherit the pretrain's tower
    image_weights: str = ""
    batch_size: int = 96
    pretrain_steps: int = 300  # ITC steps on the noisy pairs; the final model gets the same budget
    pretrain_refine: int = 200  # ITM refinement steps after them
    filter_steps: int = 150  # fine-tuning steps on the clean pairs
    filter_refine: int = 150
    captioner_steps: int = (
        300  # captioner steps on the clean pairs (decoder and image tower: docs/capfilt.md)
    )
    bootstrap: BootstrapConfig = field(default_factory=lambda: BootstrapConfig(samples=2))
    eval_pairs: str | None = None  # held-out pairs for recall and caption metrics; none: no evaluation
    overrides: tuple[str, ...] = ()  # more `--set key=value` for every retrieval training stage
    seed: int = 0


def _complete(directory: Path, steps: int, refined: bool) -> bool:
    try:
        training = json.loads((directory / "config.json").read_text()).get("training", {})
    except (OSError, json.JSONDecodeError):
        return False
    return training.get("step") == steps and (bool(training.get("refined")) or not refined)


def _train(pairs: str, out: Path, overrides: list[str], steps: int, refined: bool, progress: bool) -> str:
    """One training stage: skipped when complete, resumed when interrupted."""
    from retrieval.train import resume as saved
    from retrieval.train.config import load_train_config
    from retrieval.train.loop import train

    if _complete(out, steps, refined):
        _say(f"capfilt: {out.name} is complete, skipped", progress)
        return "skipped"
    cfg = load_train_config(None, overrides)
    train(pairs, out, cfg, resume=saved.has_state(out), progress=progress)
    return "trained"


def _say(text: str, progress: bool) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def capfilt(
    noisy: str, clean: str, out: str | Path, cfg: CapfiltConfig = CapfiltConfig(), progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) the loop; returns the report also written to OUT/report.json."""
    from retrieval.data.pairs import detect_format
    from retrieval.models.encoders import resolve_device
    from retrieval.pipelines.itm_filter import calibrate, recorded_threshold

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in (noisy, clean):
        detect_format(name)  # a bad path fails here, before any work
    base = [
        f"model.arch={cfg.arch}",
        f"batch_size={cfg.batch_size}",
        f"seed={cfg.seed}",
        "save_every=100",
        *cfg.overrides,
    ]
    scratch = [f"model.image_weights={cfg.image_weights}"] if cfg.image_weights else []
    stages: dict[str, Any] = {}

    def timed(name: str, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        stages[name] = {
            "result": result if isinstance(result, str) else "done",
            "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1),
        }
        return result

    pre = out / "pretrain"
    timed(
        "pretrain",
        lambda: _train(
            noisy,
            pre,
            [*base, *scratch, f"steps={cfg.pretrain_steps}", f"refine.steps={cfg.pretrain_refine}"],
            cfg.pretrain_steps,
            True,
            progress,
        ),
    )
    filt = out / "filter"
    timed(
        "filter",
        lambda: _train(
            clean,
            filt,
            [
                *base,
                f"model.init_checkpoint={pre}",
                f"steps={cfg.filter_steps}",
                f"refine.steps={cfg.filter_refine}",
            ],
            cfg.filter_steps,
            True,
            progress,
        ),
    )
    device = resolve_device(cfg.bootstrap.device)
    if recorded_threshold(str(filt)) is None:
        timed("calibrate", lambda: calibrate(str(filt), clean, device, seed=cfg.seed))
    cap = out / "captioner"
    timed(
        "captioner",
        lambda: _train(
            clean,
            cap,
            [
                *base,
                "task=caption",
                f"model.init_checkpoint={pre}",
                "caption.freeze_image=false",
                f"steps={cfg.captioner_steps}",
                "optim.warmup_steps=50",
            ],
            cfg.captioner_steps,
            False,
            progress,
        ),
    )
    boot = timed("bootstrap", lambda: bootstrap(noisy, out, str(cap), str(filt), cfg.bootstrap, progress))
    kept_name = output_names(detect_format(noisy))[0]
    final = out / "model"
    timed(
        "model",
        lambda: _train(
            str(out / kept_name),
            final,
            [*base, *scratch, f"steps={cfg.pretrain_steps}", f"refine.steps={cfg.pretrain_refine}"],
            cfg.pretrain_steps,
            True,
            progress,
        ),
    )
    report: dict[str, Any] = {
        "noisy": noisy,
        "clean": clean,
        "config": dataclasses.asdict(cfg),
        "bootstrap": boot,
        "filter": json.loads((filt / "config.json").read_text())["filter"],
    }
    if cfg.eval_pairs:
        report["eval"] = timed("evaluate", lambda: evaluate_stages(out, cfg.eval_pairs, device))
    report["stages"] = stages
    report["cpu_s"] = round(sum(s["cpu_s"] for s in stages.values()), 1)
    atomic_write(out / "report.json", json.dumps(report, indent=2).encode())
    return report


def evaluate_stages(out: Path, pairs: str, device) -> dict[str, Any]:
    """t2i/i2t recall of the pretrained (raw noisy) and final (bootstrapped) models, the captioner's metrics."""
    from retrieval.eval.captions import evaluate_captioner
    from retrieval.eval.suite import SuiteConfig, evaluate_checkpoint
    from retrieval.models.captioner import load_captioner

    result: dict[str, Any] = {}
    for name in ("pretrain", "model"):
        metrics = evaluate_checkpoint(out / name, SuiteConfig(pairs=pairs, device=str(device)))
        result[name] = {k: v for k, v in metrics.items() if k.startswith(("t2i", "i2t"))}
    model, _, _ = load_captioner(out / "captioner")
    result["captioner"] = evaluate_captioner(model, pairs, device=device)
    return result


def check_inputs(noisy: str, clean: str) -> None:
    if Path(noisy).resolve() == Path(clean).resolve():
        raise UserError("capfilt needs a clean set apart from the noisy pairs (--clean)")

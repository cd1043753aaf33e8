"""The training loop: knows no specific loss. A task module's forward returns a dict with "loss".

    train() = setup (train/setup.py) -> resume (train/resume.py) -> joint steps -> the ITM refinement stage
    (train/refine.py) -> checkpoint

One process, or many under torchrun (DDP; gloo on the CPU, nccl on GPUs; features gathered for a global
contrastive batch). Resumable exactly: the resume state holds weights, optimizer, schedule, step, the RNG states,
the momentum model/queue and the data stream's position, and the in-memory batch order is a pure function of the
step (train/data.py).

    OUT/config.json + *.safetensors   the checkpoint (DESIGN.md), usable by index/search/eval --checkpoint OUT
    OUT/resume/                       the full training state
    OUT/log.jsonl                     one line per log_every steps: losses, lr, temperature, samples/s, evals
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.distributed as dist

from retrieval.data.pairs import load_pairs
from retrieval.errors import UserError
from retrieval.lifecycle import Interrupted, deferred_stop
from retrieval.models.checkpoint import save_checkpoint
from retrieval.models.encoders import normalize
from retrieval.progress import progress_bar
from retrieval.train import resume as saved
from retrieval.train.config import TrainConfig
from retrieval.train.refine import refine_fusion
from retrieval.train.setup import Run, log_line, setup


def train(
    pairs_source: str,
    out: str | os.PathLike,
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
):
    """Train to cfg.steps, or only up to `stop_after` (a time-sliced job; --resume continues it)."""
    out = Path(out)
    if cfg.task == "caption":  # the captioner (objective lm): its own task and steps, the same files
        from retrieval.train.caption import train_captioner

        return train_captioner(pairs_source, out, cfg, resume, progress, stop_after)
    if not resume and saved.has_state(out):
        raise UserError(
            f"{out} already holds a training run; pass --resume to continue it, or choose another --out"
        )
    run = setup(pairs_source, out, cfg, progress)
    start, state = saved.load_state(out, run.task, run.opt, run.sched) if resume else (0, {})
    if "data" in state:
        run.data.restore(state["data"])
    refined = resume and saved.is_refined(out)  # the run ended, refinement stage included: nothing left to do
    log = _Log(out / "log.jsonl", run.rank)
    if run.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        saved.truncate_log(log.path, math.inf if refined else start)
        log_line(f"{run.summary}; {cfg.optim.preset} preset; steps {start}->{cfg.steps}")
    eval_pairs = load_pairs(cfg.eval_pairs) if cfg.eval_pairs and run.rank == 0 else None
    metrics: dict[str, Any] = {}
    if eval_pairs is not None and start == 0:
        metrics = _evaluate(run, eval_pairs)  # step 0: the start model as it was loaded
        log({"step": 0, **{f"eval.{k}": v for k, v in metrics.items()}})

    last = min(cfg.steps, stop_after) if stop_after else cfg.steps
    step, metrics = _joint_steps(run, start, last, log, eval_pairs, metrics, progress)
    stage = cfg.objectives.itm and cfg.refine.steps > 0
    finished = step == cfg.steps and step > start  # this call trained the last joint step
    if stage and step == cfg.steps and not (start == cfg.steps and refined):
        # a run killed during the stage resumes from the joint run's last checkpoint and refines again
        metrics = _refine_stage(run, step, log, eval_pairs, metrics, progress)
        finished = True
    elif run.rank == 0 and step == start and start:
        log_line(f"{out} had already reached step {start}")
    if finished and run.start_state is not None and run.rank == 0:
        metrics = _wise(run, step, log, eval_pairs, metrics, refined=stage)
    if run.world > 1:
        dist.barrier()
    return {"out": str(out), "steps": step, "metrics": metrics}


class _Log:
    """Appends JSON lines to OUT/log.jsonl on rank 0."""

    def __init__(self, path: Path, rank: int):
        self.path, self.rank = path, rank

    def __call__(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _joint_steps(run: Run, start: int, last: int, log, eval_pairs, metrics, progress: bool):
    cfg = run.cfg
    engine = (
        torch.nn.parallel.DistributedDataParallel(
            run.task,
            broadcast_buffers=False,
            find_unused_parameters=not (cfg.objectives.itm and cfg.objectives.joint_itm),
        )
        if run.world > 1
        else run.task
    )
    bar = progress_bar(
        desc="train", unit="step", enabled=progress and run.rank == 0, total=cfg.steps, initial=start
    )
    window: dict[str, float] = {}
    t0 = time.perf_counter()
    batches = run.data.batches(start * cfg.grad_accum)
    step = done = last_saved = start
    try:
        for step in range(start + 1, last + 1):
            run.task.train()
            for module in run.frozen:
                module.eval()
            for _ in range(cfg.grad_accum):
                losses = _forward(run, engine, next(batches))
                (losses["loss"] / cfg.grad_accum).backward()
                for k, v in losses.items():
                    window[k] = window.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(run.task.parameters(), cfg.optim.grad_clip)
            # a stop signal waits for the step to end, logged and saved as due: never weights between two steps
            with deferred_stop():
                run.opt.step()
                run.sched.step()
                run.opt.zero_grad(set_to_none=True)
                run.task.after_step()
                done = step
                bar.update(1)
                if run.rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                    n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                    record = {
                        "step": step,
                        **{k: round(v / n, 5) for k, v in window.items()},
                        "lr": run.sched.get_last_lr()[0],
                        "temperature": round(1 / run.model.logit_scale.exp().item(), 5),
                        "samples_per_s": round(
                            n * cfg.batch_size * cfg.grad_accum * run.world / (time.perf_counter() - t0), 1
                        ),
                    }
                    if eval_pairs is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                        metrics = _evaluate(run, eval_pairs)
                        record.update({f"eval.{k}": v for k, v in metrics.items()})
                    log(record)
                    bar.set_postfix({"loss": f"{record['loss']:.3f}"})
                    window, t0 = {}, time.perf_counter()
                if run.rank == 0 and (step % cfg.save_every == 0 or step == last):
                    _checkpoint(run, step, metrics)
                    last_saved = step
    except KeyboardInterrupt:
        bar.close()
        if run.rank == 0 and done > last_saved:
            _checkpoint(run, done, metrics)  # every step up to `done` is complete: --resume continues exactly
            last_saved = done
        kept = (
            f"the checkpoint of step {last_saved} in {run.out} is kept"
            if last_saved
            else "no step was completed"
        )
        raise Interrupted(f"stopped at step {done} of {cfg.steps}; {kept}; --resume continues") from None
    bar.close()
    return step, metrics


def _forward(run: Run, engine, batch) -> dict[str, torch.Tensor]:
    x = normalize(batch.pixels, run.preprocess["mean"], run.preprocess["std"], run.device)
    negatives = [
        t.to(run.device) if t is not None else None for t in (batch.negative_tokens, batch.negative_valid)
    ]
    with torch.autocast(run.device.type, dtype=run.amp, enabled=run.amp is not None):
        return engine(x, batch.tokens.to(run.device), batch.ids.to(run.device), *negatives)


def _refine_stage(run: Run, step: int, log, eval_pairs, metrics, progress: bool) -> dict[str, Any]:
    cfg = run.cfg
    if run.rank == 0:
        # with distillation the momentum model also judges which pairs the stage learns from (refine.py)
        teacher = run.task.momentum_model if cfg.refine.teacher_sampling else None
        data = run.data.refine_set()
        try:
            refine_fusion(run.model, data, cfg, run.preprocess, run.device, run.amp, log, progress, teacher)
        except KeyboardInterrupt:
            raise Interrupted(
                f"stopped in the refinement stage; the checkpoint of step {step} in {run.out} is kept; "
                "--resume runs the stage again"
            ) from None
        if eval_pairs is not None:
            metrics = _evaluate(run, eval_pairs)
            log(
                {
                    "step": cfg.steps + cfg.refine.steps,
                    "stage": "refine",
                    **{f"eval.{k}": v for k, v in metrics.items()},
                }
            )
        _checkpoint(run, step, metrics, refined=True)
    return metrics


def _wise(run: Run, step: int, log, eval_pairs, metrics, refined: bool) -> dict[str, Any]:
    """WiSE-FT: the final weights moved back towards the start's, by optim.wise, then saved as the checkpoint. The
    resume state keeps the fine-tuned weights themselves."""
    alpha = run.cfg.optim.wise
    with torch.no_grad():
        for name, tensor in run.model.state_dict().items():
            start = run.start_state.get(name)
            if start is not None and tensor.is_floating_point():
                tensor.copy_(start.to(tensor.device, tensor.dtype).lerp(tensor, alpha))
    if eval_pairs is not None:
        metrics = _evaluate(run, eval_pairs)
    log(
        {
            "step": run.cfg.steps + (run.cfg.refine.steps if refined else 0),
            "stage": "wise",
            "wise": alpha,
            **{f"eval.{k}": v for k, v in metrics.items()},
        }
    )
    log_line(
        f"final weights: {alpha:g} of the fine-tuned ones + {1 - alpha:g} of the start's (optim.wise, WiSE-FT)"
    )
    _checkpoint(run, step, metrics, refined=refined, state=False)
    return metrics


def _checkpoint(
    run: Run, step: int, metrics: dict[str, Any], refined: bool = False, state: bool = True
) -> None:
    cfg = run.cfg
    extra = {
        "training": {
            "pairs": str(run.source),
            "step": step,
            "refined": refined,
            "config": dataclasses.asdict(cfg),
            "metrics": metrics,
            "wise": cfg.optim.wise if run.start_state is not None and not state else None,
        },
        "fusion": dataclasses.asdict(run.model.fusion_cfg),
    }
    save_checkpoint(run.out, run.arch, run.task.components(refined or run.fusion_trained), extra=extra)
    if state:
        saved.save_state(run.out, run.task, run.opt, run.sched, step, {"data": run.data.state()})


def _evaluate(run: Run, pairs) -> dict[str, Any]:
    from retrieval.eval.evaluate import EvalConfig, evaluate

    result = evaluate(
        run.model,
        pairs,
        EvalConfig(limit=run.cfg.eval_limit, binding=False),
        image_size=run.image_size,
        mean=run.preprocess["mean"],
        std=run.preprocess["std"],
        tokenizer=open_clip.get_tokenizer(run.arch),
        device=run.device,
    )
    return {k: v for k, v in result.items() if k.startswith(("t2i", "i2t"))}

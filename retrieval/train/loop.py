"""The training loop: knows no specific loss. A task module's forward returns a dict with "loss".

One process, or many under torchrun (DDP; gloo on the CPU, nccl on GPUs; features gathered for a global
contrastive batch). Resumable exactly: the resume state holds weights, optimizer, schedule, step, the RNG states
and the momentum model/queue, and the batch order is a pure function of the step (train/data.py).

    OUT/config.json + *.safetensors   the checkpoint (DESIGN.md), usable by index/search/eval --checkpoint OUT
    OUT/resume/                       the full training state (task.safetensors, state.pt)
    OUT/log.jsonl                     one line per log_every steps: losses, lr, temperature, samples/s, evals
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_model
from tqdm import tqdm

from retrieval.data.pairs import PairStats
from retrieval.errors import UserError
from retrieval.lifecycle import Interrupted
from retrieval.models.albef import AlbefModel
from retrieval.models.checkpoint import load_dual_encoder, read_config, save_checkpoint
from retrieval.models.encoders import autocast_dtype, create_clip, resolve_device
from retrieval.train.config import TrainConfig
from retrieval.train.data import BatchPlan, PairImages, TrainData, describe_skips, load_pairs, normalize
from retrieval.train.neighbours import caption_neighbours, mined_neighbours
from retrieval.train.optim import fused_adamw, lr_lambda, param_groups
from retrieval.train.refine import refine_fusion
from retrieval.train.tasks import ItcItmTask

RESUME = "resume"


def _dist() -> tuple[int, int]:
    """Initialise torch.distributed when launched by torchrun; returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def build_model(cfg: TrainConfig) -> tuple[AlbefModel, str]:
    mc = cfg.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if mc.init_checkpoint:
            clip, arch, _ = load_dual_encoder(mc.init_checkpoint)
        else:
            clip, _ = create_clip(mc.arch, mc.pretrained, cfg.seed)
            arch = mc.arch
        with torch.no_grad():
            clip.logit_scale.fill_(math.log(1.0 / cfg.objectives.temperature))
        model = AlbefModel(clip, mc.fusion)
    return model, arch


def _save_resume(out: Path, task: ItcItmTask, opt, sched, step: int, data_state: dict[str, Any]) -> None:
    state_dir = out / RESUME
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / ".task.safetensors.tmp"
    save_model(task, str(tmp))
    state = {
        "step": step,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "sampler_rng": task.sampler.get_state(),
        **data_state,  # e.g. the mined neighbour table, a function of a model state the resumed run lacks
    }
    torch.save(state, state_dir / ".state.pt.tmp")
    os.replace(tmp, state_dir / "task.safetensors")
    os.replace(state_dir / ".state.pt.tmp", state_dir / "state.pt")  # last: its step names a complete state


def _load_resume(out: Path, task: ItcItmTask, opt, sched) -> tuple[int, dict[str, Any]]:
    state_dir = out / RESUME
    if not (state_dir / "state.pt").exists():
        return 0, {}
    missing, unexpected = task.load_state_dict(load_file(str(state_dir / "task.safetensors")), strict=False)
    if missing or unexpected:
        raise UserError(
            f"{state_dir}: the saved state does not fit this config (e.g. {(missing or unexpected)[0]})"
        )
    state = torch.load(state_dir / "state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    task.sampler.set_state(state["sampler_rng"])
    return int(state["step"]), state


def _truncate_log(path: Path, step: int) -> None:
    """A resumed run rewrites the lines past its resume point, so the curve continues without duplicates."""
    if not path.exists():
        return
    keep = [
        line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def train(
    pairs_source: str,
    out: str | os.PathLike,
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
):
    """Train to cfg.steps, or only up to `stop_after` (a time-sliced job; --resume continues it)."""
    rank, world = _dist()
    out = Path(out)
    if not resume and (out / RESUME / "state.pt").exists():
        raise UserError(
            f"{out} already holds a training run; pass --resume to continue it, or choose another --out"
        )
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    amp = autocast_dtype(device, cfg.precision)

    stats = PairStats()
    pairs = load_pairs(pairs_source, stats)
    model, arch = build_model(cfg)
    if cfg.grad_checkpointing:
        model.clip.set_grad_checkpointing(True)
    preprocess = model.clip.visual.preprocess_cfg
    image_size = model.clip.visual.image_size
    image_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)
    images = PairImages(pairs, image_size, cfg.cache_images, cfg.max_cache_gb, progress and rank == 0)
    near = None
    if cfg.hard_batches > 0:
        near = caption_neighbours([p.caption for p in pairs], cfg.neighbours, seed=cfg.seed)  # (N, k)
    # each batch: batch_size - twins rows of the plan, then their mirror twins
    twins = round(cfg.twins * cfg.batch_size)
    plan = BatchPlan(images.valid, cfg.batch_size - twins, cfg.seed, rank, world, near, cfg.hard_batches)
    tokenizer = open_clip.get_tokenizer(arch)
    data = TrainData(pairs, images, tokenizer, plan, cfg.objectives.text_negatives, twins, cfg.twins_vertical)
    task = ItcItmTask(model, cfg.objectives, cfg.seed + rank).to(device)
    opt = torch.optim.AdamW(
        param_groups(task, cfg.optim.weight_decay, cfg.optim.lr, cfg.optim.lr * cfg.optim.fusion_lr_scale),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        fused=fused_adamw(device),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    start, state = _load_resume(out, task, opt, sched) if resume else (0, {})
    refined = resume and _refined(out)  # the run ended, refinement stage included: nothing left to do
    mine = cfg.hard_batches > 0 and cfg.mine_every > 0 and images.cache is not None
    if "neighbours" in state:
        plan.set_neighbours(state["neighbours"])

    def remine() -> None:
        def to_input(pixels: torch.Tensor) -> torch.Tensor:
            return normalize(pixels, preprocess["mean"], preprocess["std"], device)

        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            near = mined_neighbours(
                model.clip, images.cache, images.valid, data.tokens, data.ids, to_input, cfg.neighbours
            )
        plan.set_neighbours(near)

    engine = (
        torch.nn.parallel.DistributedDataParallel(
            task,
            broadcast_buffers=False,
            find_unused_parameters=not (cfg.objectives.itm and cfg.objectives.joint_itm),
        )
        if world > 1
        else task
    )

    log_path = out / "log.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        _truncate_log(log_path, math.inf if refined else start)
        print(
            f"{len(pairs)} pairs from {pairs_source} ({describe_skips(stats, images)}); steps {start}->{cfg.steps}",
            file=sys.stderr,
        )
    eval_pairs = load_pairs(cfg.eval_pairs) if cfg.eval_pairs and rank == 0 else None

    def checkpoint(step: int, metrics: dict[str, Any], refined: bool = False) -> None:
        extra = {
            "training": {
                "pairs": str(pairs_source),
                "step": step,
                "refined": refined,
                "config": dataclasses.asdict(cfg),
                "metrics": metrics,
            },
            "fusion": dataclasses.asdict(model.fusion_cfg),
        }
        save_checkpoint(out, arch, task.components(refined), extra=extra)
        _save_resume(out, task, opt, sched, step, {"neighbours": plan.neighbours} if mine else {})

    bar = tqdm(
        total=cfg.steps, initial=start, unit="step", file=sys.stderr, disable=not (progress and rank == 0)
    )
    window, t0, metrics = {}, time.perf_counter(), {}
    step = start
    last = min(cfg.steps, stop_after) if stop_after else cfg.steps
    done = saved = start
    stepping = False
    try:
        for step in range(start + 1, last + 1):
            if mine and step > 1 and (step - 1) % cfg.mine_every == 0:
                remine()  # every rank mines the same table from the same weights
            task.train()
            for micro in range(cfg.grad_accum):
                batch = data.batch((step - 1) * cfg.grad_accum + micro)
                x = normalize(batch.pixels, preprocess["mean"], preprocess["std"], device)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    negatives = [
                        t.to(device) if t is not None else None
                        for t in (batch.negative_tokens, batch.negative_valid)
                    ]
                    losses = engine(x, batch.tokens.to(device), batch.caption_ids.to(device), *negatives)
                (losses["loss"] / cfg.grad_accum).backward()
                for k, v in losses.items():
                    window[k] = window.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.optim.grad_clip)
            stepping = True  # from here to after_step the weights are between two steps
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            task.after_step()
            stepping, done = False, step
            bar.update(1)

            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                seconds = time.perf_counter() - t0
                record = {
                    "step": step,
                    **{k: round(v / n, 5) for k, v in window.items()},
                    "lr": sched.get_last_lr()[0],
                    "temperature": round(1 / model.logit_scale.exp().item(), 5),
                    "samples_per_s": round(n * cfg.batch_size * cfg.grad_accum * world / seconds, 1),
                }
                if eval_pairs is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                    metrics = _evaluate(model, eval_pairs, cfg, image_size, preprocess, arch, device)
                    record.update({f"eval.{k}": v for k, v in metrics.items()})
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                shown = {"loss": f"{record['loss']:.3f}"}
                if "itm_acc" in record:
                    shown["itm_acc"] = f"{record['itm_acc']:.2f}"
                bar.set_postfix(shown)
                window, t0 = {}, time.perf_counter()
            if rank == 0 and (step % cfg.save_every == 0 or step == last):
                checkpoint(step, metrics)
                saved = step
    except KeyboardInterrupt:
        bar.close()
        if rank == 0 and done > saved and not stepping:
            checkpoint(done, metrics)  # every step up to `done` is complete: --resume continues exactly
            saved = done
        kept = f"the checkpoint of step {saved} in {out} is kept" if saved else "no step was completed"
        raise Interrupted(f"stopped at step {done} of {cfg.steps}; {kept}; --resume continues") from None
    bar.close()
    refine = cfg.objectives.itm and cfg.refine.steps > 0 and step == cfg.steps
    if rank == 0 and refine and not (start == cfg.steps and refined):
        # a run killed during the stage resumes from the joint run's last checkpoint and refines again
        def log(record: dict[str, Any]) -> None:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

        # with distillation the momentum model also judges which pairs the stage learns from (refine.py)
        teacher = task.momentum_model if cfg.refine.teacher_sampling else None
        try:
            refine_fusion(model, data, cfg, preprocess, device, amp, log, progress, teacher)
        except KeyboardInterrupt:
            raise Interrupted(
                f"stopped in the refinement stage; the checkpoint of step {step} in {out} is kept; "
                "--resume runs the stage again"
            ) from None
        if eval_pairs is not None:
            metrics = _evaluate(model, eval_pairs, cfg, image_size, preprocess, arch, device)
            log(
                {
                    "step": cfg.steps + cfg.refine.steps,
                    "stage": "refine",
                    **{f"eval.{k}": v for k, v in metrics.items()},
                }
            )
        checkpoint(step, metrics, refined=True)
    elif rank == 0 and step == start and start:
        print(f"{out} had already reached step {start}", file=sys.stderr)
    if world > 1:
        dist.barrier()
    return {"out": str(out), "steps": step, "metrics": metrics}


def _refined(out: Path) -> bool:
    """Whether the checkpoint in `out` has been through the ITM refinement stage."""
    try:
        return bool(read_config(out).get("training", {}).get("refined"))
    except (UserError, OSError, ValueError):  # no or unreadable checkpoint: not refined
        return False


def _evaluate(model, pairs, cfg: TrainConfig, image_size, preprocess, arch, device) -> dict[str, Any]:
    from retrieval.eval.evaluate import EvalConfig, evaluate

    model.eval()
    try:
        result = evaluate(
            model,
            pairs,
            EvalConfig(limit=cfg.eval_limit, binding=False),
            image_size=image_size,
            mean=preprocess["mean"],
            std=preprocess["std"],
            tokenizer=open_clip.get_tokenizer(arch),
            device=device,
        )
    finally:
        model.train()
    return {k: v for k, v in result.items() if k.startswith(("t2i", "i2t"))}

"""The captioner's training task (objective lm, `retrieval train --task caption`): an image-grounded decoder
trained by next-token cross-entropy, through the same phases as the retrieval model's run: setup, resume, steps,
logs in OUT/log.jsonl, checkpoints in OUT (dual_encoder = the image tower, captioner = the decoder) and
OUT/resume/ (train/resume.py), Ctrl-C keeping the last complete step.

The image tower comes from model.init_checkpoint (e.g. the ITC-pretrained model of `retrieval capfilt`) or is
built from model.arch; with caption.freeze_image it stays as it is and only the decoder learns.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from retrieval.data.pairs import PairStats
from retrieval.data.recolour import choose
from retrieval.errors import UserError
from retrieval.lifecycle import Interrupted
from retrieval.losses.captioning import lm_loss
from retrieval.models.captioner import UNK, Captioner, CaptionerConfig, Vocab
from retrieval.models.checkpoint import save_checkpoint
from retrieval.models.encoders import normalize, resolve_device
from retrieval.progress import progress_bar
from retrieval.train import resume as saved
from retrieval.train.config import TrainConfig
from retrieval.train.data import BatchPlan, PairImages, TrainData, describe_skips, load_groups
from retrieval.train.optim import fused_adamw, lr_lambda
from retrieval.train.setup import start_clip


class CaptionTask(nn.Module):
    """forward(images, tokens) -> {"loss", "lm", "lm_acc"}; word dropout draws from its own checkpointed
    generator, so a resumed run drops the same words."""

    def __init__(self, model: Captioner, cfg: CaptionerConfig, seed: int = 0):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.sampler = torch.Generator().manual_seed(seed + 23)

    def forward(
        self, images: Tensor, tokens: Tensor, image_tokens: Tensor | None = None
    ) -> dict[str, Tensor]:
        """images (B, 3, S, S) normalised, tokens (B, L) BOS ... EOS PAD...; image_tokens (B, N, Wv): the frozen
        tower's output, cached (then images is unused)."""
        inputs = tokens[:, :-1]  # (B, L-1)
        if self.training and self.cfg.word_dropout > 0:
            drop = torch.rand(inputs.shape, generator=self.sampler) < self.cfg.word_dropout  # (B, L-1)
            drop &= inputs > UNK  # words only: BOS and padding stay
            inputs = inputs.masked_fill(drop.to(inputs.device), UNK)
        if image_tokens is None:
            image_tokens = self.model.image_tokens(images)  # (B, N, Wv)
        memory = self.model.decoder.memory(image_tokens)
        logits = self.model.decoder(inputs, memory)  # (B, L-1, V)
        out = lm_loss(logits, tokens, self.cfg.label_smoothing)
        out["loss"] = out["lm"]
        return out


def build_captioner(cfg: TrainConfig, captions: list[str]) -> tuple[Captioner, str]:
    """(captioner, architecture): the image tower of model.init_checkpoint, else a new model.arch one."""
    mc = cfg.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        clip, arch = start_clip(mc, cfg.seed)
        vocab = Vocab.build(captions, cfg.caption.max_vocab)
        model = Captioner(clip, cfg.caption, vocab)
    if cfg.caption.freeze_image:
        model.clip.requires_grad_(False)
    return model, arch


def _mirroring(cfg: TrainConfig, captions: list[str]) -> tuple[tuple[float, bool], str]:
    """((probability, vertical flips too), why) for caption.mirror: auto follows refine.relation_terms' rule."""
    from retrieval.train.refine import relation_terms

    mode, prob = cfg.caption.mirror, cfg.caption.mirror_prob  # auto | on | off, checked with the config
    on, vertical, why = relation_terms(captions, cfg.refine, cfg.seed)
    if mode != "auto":
        on, why = mode == "on", f"caption.mirror={mode}"
    if not on or prob <= 0:
        return (0.0, False), f"mirror off ({why})"
    return (prob, vertical), f"mirror on, p={prob:g}{', vertical too' if vertical else ''} ({why})"


def train_captioner(
    source: str,
    out: Path,
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train the captioner to cfg.steps (or `stop_after`); returns {"out", "steps", "metrics"}."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--task caption trains in one process (torchrun is not supported for it yet)")
    if not resume and saved.has_state(out):
        raise UserError(
            f"{out} already holds a training run; pass --resume to continue it, or choose another --out"
        )
    device = resolve_device(cfg.device)
    stats = PairStats()
    groups = load_groups(source, stats)
    model, arch = build_captioner(cfg, groups.captions)
    size = model.clip.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    images = PairImages(groups.images, size, cfg.cache_images, cfg.max_cache_gb, progress)
    plan = BatchPlan(images.valid, cfg.batch_size, cfg.seed)
    prob, recolour_why = choose(cfg.recolour, cfg.caption.recolour_prob, groups.captions)
    flip, mirror_why = _mirroring(cfg, groups.captions)
    data = TrainData(groups, images, lambda texts: model.tokenize(texts), plan, False, prob, flip)
    task = CaptionTask(model, model.cfg, cfg.seed).to(device)
    torch.manual_seed(cfg.seed + 1)  # dropout draws: a fresh run repeats itself; a resumed one restores them
    params = [p for p in task.parameters() if p.requires_grad]
    groups_ = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups_, lr=cfg.optim.lr, betas=cfg.optim.betas, fused=fused_adamw(device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    start, _ = saved.load_state(out, task, opt, sched) if resume else (0, {})
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    log_path = out / "log.jsonl"
    saved.truncate_log(log_path, start)
    from retrieval.train.setup import log_line

    log_line(
        f"captioner: {len(groups)} images, {len(groups.captions)} captions from {source} "
        f"({describe_skips(stats, images)}); vocabulary {len(model.vocab)}; {recolour_why}; {mirror_why}; "
        f"steps {start}->{cfg.steps}"
    )
    last = min(cfg.steps, stop_after) if stop_after else cfg.steps
    step = _steps(task, data, opt, sched, cfg, device, start, last, out, arch, source, log_path, progress)
    metrics: dict[str, Any] = {}
    if step == cfg.steps and step > start and cfg.eval_pairs:
        from retrieval.eval.captions import evaluate_captioner

        metrics = evaluate_captioner(model.eval(), cfg.eval_pairs, limit=cfg.eval_limit, device=device)
        _log(log_path, {"step": step, **{f"eval.{k}": v for k, v in metrics.items()}})
        _checkpoint(out, task, opt, sched, arch, source, cfg, step, metrics, state=False)
    return {"out": str(out), "steps": step, "metrics": metrics}


def _steps(task, data, opt, sched, cfg, device, start, last, out, arch, source, log_path, progress) -> int:
    bar = progress_bar(desc="train captioner", unit="step", enabled=progress, total=cfg.steps, initial=start)
    pre = task.model.clip.visual.preprocess_cfg
    window: dict[str, float] = {}
    t0, done, last_saved = time.perf_counter(), start, start
    # a frozen tower's tokens are the same every epoch unless the images are recoloured
    frozen = task.cfg.freeze_image and not data.recolour_prob and not data.mirror_prob
    cache = _token_cache(task.model, data, device, progress) if frozen else None
    batches = data.batches(start) if cache is None else _cached_batches(data, cache, start)
    try:
        for step in range(start + 1, last + 1):
            task.train()
            if task.cfg.freeze_image:
                task.model.clip.eval()
            batch = next(batches)
            if cache is None:
                x = normalize(batch.pixels, pre["mean"], pre["std"], device)
                losses = task(x, batch.tokens.to(device))
            else:
                image_tokens, tokens = batch
                losses = task(None, tokens.to(device), image_tokens.to(device))
            losses["loss"].backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.optim.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            done = step
            bar.update(1)
            for k, v in losses.items():
                window[k] = window.get(k, 0.0) + float(v.detach())
            if step % cfg.log_every == 0 or step == cfg.steps:
                n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                record = {"step": step, **{k: round(v / n, 5) for k, v in window.items()}}
                record["lr"] = sched.get_last_lr()[0]
                record["samples_per_s"] = round(n * cfg.batch_size / (time.perf_counter() - t0), 1)
                _log(log_path, record)
                bar.set_postfix({"loss": f"{record['loss']:.3f}"})
                window, t0 = {}, time.perf_counter()
            if step % cfg.save_every == 0 or step == last:
                _checkpoint(out, task, opt, sched, arch, source, cfg, step, {})
                last_saved = step
    except KeyboardInterrupt:
        bar.close()
        if done > last_saved:
            _checkpoint(out, task, opt, sched, arch, source, cfg, done, {})
            last_saved = done
        raise Interrupted(
            f"stopped at step {done} of {cfg.steps}; the checkpoint of step {last_saved} in {out} is kept; "
            "--resume continues"
        ) from None
    bar.close()
    return done


@torch.inference_mode()
def _token_cache(model: Captioner, data: TrainData, device, progress: bool, batch: int = 128) -> Tensor:
    """(I, N, Wv) the frozen tower's tokens of every training image, computed once: a frozen tower gives the
    same tokens every epoch (when nothing recolours the images), so the steps run the decoder alone."""
    pre = model.clip.visual.preprocess_cfg
    n = len(data.groups)
    model.clip.eval()
    chunks = []
    for s in progress_bar(range(0, n, batch), "image tokens", "batch", progress):
        idx = torch.arange(s, min(n, s + batch))
        pixels = torch.stack([_pixels(data, int(i)) for i in idx])  # (b, 3, S, S)
        chunks.append(model.image_tokens(normalize(pixels, pre["mean"], pre["std"], device)).cpu())
    return torch.cat(chunks)  # (I, N, Wv)


def _pixels(data: TrainData, i: int) -> Tensor:
    image = data.images[i]
    if image is None:  # undecodable: never drawn by the batch plan, a placeholder keeps the table dense
        size = data.images.size
        return torch.zeros(3, size, size, dtype=torch.uint8)
    return image


def _cached_batches(data: TrainData, cache: Tensor, start: int):
    """The batches TrainData.batch would give (same images, same captions), with cached image tokens."""
    m = start
    while True:
        idx = data.plan(m)  # (B,)
        chosen = data.pick_captions(idx, data.plan.step_seed(m, salt=29))  # (B,)
        yield cache[idx], data.tokens[chosen].long()
        m += 1


def _checkpoint(out, task, opt, sched, arch, source, cfg, step, metrics, state: bool = True) -> None:
    model: Captioner = task.model
    extra = {
        "kind": "captioner",
        "captioner": model.config_entry(),
        "training": {
            "pairs": str(source),
            "step": step,
            "task": "caption",
            "metrics": metrics,
            "config": dataclasses.asdict(cfg),
        },
    }
    save_checkpoint(out, arch, {"dual_encoder": model.clip, "captioner": model.decoder}, extra=extra)
    if state:
        saved.save_state(out, task, opt, sched, step, {})


def _log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")

"""`retrieval train DATA --out DIR --task vlm --vision CKPT`: the connector (and optionally the LLM) of a VLM.

    stage 1  caption rows: the connector alone learns to say what the image shows (the LLM frozen)
    stage 2  question rows: instruction tuning; the LLM frozen (default), or tuned with LoRA, or fully

The frozen vision tower's outputs are cached once per image (exact). Same conventions as the other training:
OUT/log.jsonl (one line per log_every steps), a checkpoint every save_every steps and at the end (a VLM checkpoint,
models/vlm_checkpoint.py), OUT/resume/ with what --resume needs to continue exactly (the trainable weights,
optimizer, schedule, step; batches are a pure function of the step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from retrieval.data.recolour import choose, colours_named
from retrieval.errors import UserError
from retrieval.lifecycle import Interrupted
from retrieval.models.vlm_checkpoint import build_vlm, save_vlm
from retrieval.progress import progress_bar
from retrieval.train.setup import log_line
from retrieval.train.vlm_config import VlmTrainConfig
from retrieval.train.vlm_data import Recoloured, cache_features, draw, load_pixels, read_rows

RESUME = "resume"


def _schedule(cfg: VlmTrainConfig, total: int, clock: dict[str, float]):
    """Linear warmup, then cosine over the steps, or over time when cfg.time_budget_min is set."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        if cfg.time_budget_min > 0:
            progress = max(progress, clock["elapsed"] / (60 * cfg.time_budget_min))
        progress = min(1.0, progress)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _trainable(
    vlm, cfg: VlmTrainConfig, stage: int
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(connector parameters, LLM parameters that learn in this stage); everything else frozen."""
    vlm.llm.requires_grad_(False)
    connector = list(vlm.connector.parameters()) + (
        list(vlm.xattn.parameters()) if vlm.xattn is not None else []
    )
    for p in connector:
        p.requires_grad_(True)
    llm: list[torch.nn.Parameter] = []
    if stage == 2 and cfg.tune == "lora":
        llm = [p for n, p in vlm.llm.named_parameters() if "lora_" in n]
    elif stage == 2 and cfg.tune == "full":
        ids = {id(p) for p in connector}  # the xattn blocks live inside the LLM's layers
        llm = [p for p in vlm.llm.parameters() if id(p) not in ids]
    for p in llm:
        p.requires_grad_(True)
    return connector, llm


def _conversations(rows, stage: int) -> tuple[list[int], list[list[tuple[str, str]]]]:
    """Per image with rows of this stage: (image index, its (question, answer) pairs); stage 1's question is the
    caption prompt's, filled in by the caller."""
    by_image: dict[int, list[tuple[str, str]]] = {}
    if stage == 1:
        for image, caption in rows.captions:
            by_image.setdefault(image, []).append(("", caption))
    else:
        for image, question, answer in rows.qa:
            by_image.setdefault(image, []).append((question, answer))
    images = sorted(by_image)
    return images, [by_image[i] for i in images]


def _batch(vlm, cfg: VlmTrainConfig, chats, stage: int, rng: np.random.Generator):
    """Token ids and learned flags of one conversation per drawn image: up to cfg.turns of its questions in a
    random order (stage 1: one of its captions)."""
    ids, learn = [], []
    for chat in chats:
        order = rng.permutation(len(chat))
        if stage == 1:
            turns = [(vlm.prompt.caption, chat[order[0]][1])]
        else:
            turns = [chat[k] for k in order[: cfg.turns]]
        i, l_ = vlm.encode_turns(turns)
        ids.append(i)
        learn.append(l_)
    return ids, learn


def train_vlm(
    data: str,
    out: str | os.PathLike,
    vision: str | None,
    cfg: VlmTrainConfig,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train to stage1_steps + steps, or only up to `stop_after` (--resume continues)."""
    out = Path(out)
    if not resume and (out / RESUME / "state.pt").exists():
        raise UserError(
            f"{out} already holds a training run; pass --resume to continue it, or choose another --out"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if resume and vision is None and (out / "config.json").exists():
        from retrieval.models.vlm_checkpoint import read_vlm_config

        vision = (read_vlm_config(out).get("vision") or {}).get("source")  # the run's own tower
    rows = read_rows(data)
    if not rows.qa and not rows.captions:
        raise UserError(f"{data}: no usable rows (image + caption, or image + question + answer)")
    vlm = build_vlm(cfg.llm, vision, cfg.connector, cfg.prompt)
    if cfg.tune == "lora":
        from retrieval.train.lora import add_lora

        add_lora(vlm.llm, dataclasses.asdict(cfg.lora))
    if cfg.init_checkpoint:
        from retrieval.models.vlm_checkpoint import load_weights

        load_weights(vlm, cfg.init_checkpoint)
    pixels, ok = load_pixels(rows.images, vlm.image["size"], progress)
    feats = cache_features(vlm, pixels)  # (N, ...) the frozen tower's output per image
    texts = [c for _, c in rows.captions] + [f"{q} {a}" for _, q, a in rows.qa]
    prob, recolour_why = choose(cfg.recolour, cfg.recolour_prob, texts)
    copies = None
    if prob and cfg.recolour_variants > 0:
        copies = Recoloured(vlm, pixels, feats, colours_named(texts), cfg.recolour_variants, cfg.seed)
    stages = [(1, cfg.stage1_steps if rows.captions else 0), (2, cfg.steps if rows.qa else 0)]
    total = sum(n for _, n in stages)
    all_params = list(vlm.connector.parameters()) + (
        list(vlm.xattn.parameters()) if vlm.xattn is not None else []
    )
    _, llm_params = _trainable(vlm, cfg, 2)
    groups = [{"params": all_params, "lr": cfg.lr}] + (
        [{"params": llm_params, "lr": cfg.llm_lr}] if llm_params else []
    )
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    clock = {"elapsed": 0.0}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, total, clock))
    start = _load_state(out, vlm, opt, sched) if resume else 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    log_path = out / "log.jsonl"
    _truncate(log_path, start)
    log_line(
        f"{len(rows.images)} images, {len(rows.captions)} captions, {len(rows.qa)} questions from {data} "
        f"({rows.skipped} rows skipped, {ok.count(False)} images unreadable); connector {cfg.connector.type} "
        f"({vlm.connector.tokens} image tokens), LLM {cfg.llm} {cfg.tune}; {recolour_why}; steps {start}->{total}"
    )
    last = min(total, stop_after) if stop_after else total
    bar = progress_bar(desc="train vlm", unit="step", enabled=progress, total=total, initial=start)
    amp = cfg.precision == "bf16"
    step, offset, metrics = start, 0, {}
    t0, cpu0, window = time.perf_counter(), time.process_time(), []
    began, cpu_began = time.perf_counter(), time.process_time()
    try:
        for stage, n in stages:
            if n == 0:
                continue
            if step >= offset + n:
                offset += n
                continue
            _trainable(vlm, cfg, stage)
            images, chats = _conversations(rows, stage)
            usable = [i for i, img in enumerate(images) if ok[img]]
            vlm.llm.train(cfg.tune != "frozen" and stage == 2)
            vlm.connector.train()
            while step < min(offset + n, last):
                pick = [usable[i] for i in draw(len(usable), cfg.batch_size, cfg.seed + stage, step)]
                index = torch.tensor([images[i] for i in pick])  # (B,)
                drawn = [chats[i] for i in pick]
                if copies is None:
                    batch = feats[index]
                else:
                    batch, drawn = copies.draw(
                        index, drawn, prob, np.random.default_rng((cfg.seed, stage, step, 2))
                    )
                rng = np.random.default_rng((cfg.seed, stage, step, 1))
                ids, learn = _batch(vlm, cfg, drawn, stage, rng)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    loss = vlm.loss(batch, ids, learn)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in opt.param_groups for p in g["params"]], cfg.grad_clip
                    )
                opt.step()
                clock["elapsed"] = time.perf_counter() - began
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                window.append(float(loss.detach()))
                bar.update(1)
                if step % cfg.log_every == 0 or step == total:
                    record = {
                        "step": step,
                        "stage": stage,
                        "loss": round(sum(window) / len(window), 5),
                        "lr": sched.get_last_lr()[0],
                        "images_per_s": round(len(window) * cfg.batch_size / (time.perf_counter() - t0), 2),
                        "cpu_s_per_step": round((time.process_time() - cpu0) / len(window), 3),
                    }
                    if cfg.eval_questions and (step % cfg.eval_every == 0 or step == total):
                        metrics = _evaluate(vlm, cfg)
                        record.update({f"eval.{k}": v for k, v in metrics.items()})
                        vlm.connector.train()
                    _append(log_path, record)
                    bar.set_postfix({"loss": f"{record['loss']:.3f}"})
                    t0, cpu0, window = time.perf_counter(), time.process_time(), []
                over = cfg.time_budget_min > 0 and clock["elapsed"] >= 60 * cfg.time_budget_min
                if step % cfg.save_every == 0 or step == last or over:
                    _save(out, vlm, cfg, opt, sched, step, data, metrics)
                if over:
                    log_line(f"time budget of {cfg.time_budget_min:g} min reached at step {step}")
                    last = step
                    break
            if last == step and step < total:
                break
            offset += n
    except KeyboardInterrupt:
        bar.close()
        _save(out, vlm, cfg, opt, sched, step, data, metrics)
        raise Interrupted(
            f"stopped at step {step} of {total}; the checkpoint of step {step} in {out} is kept; --resume continues"
        ) from None
    bar.close()
    if step > start:
        _append(
            log_path,
            {
                "step": step,
                "train_wall_s": round(time.perf_counter() - began, 1),
                "train_cpu_s": round(time.process_time() - cpu_began, 1),
            },
        )
    if step == start and start:
        log_line(f"{out} had already reached step {start}")
    return {"out": str(out), "steps": step, "metrics": metrics, "model": vlm}


def _evaluate(vlm, cfg: VlmTrainConfig) -> dict[str, Any]:
    from retrieval.eval.vqa import evaluate_vqa

    result = evaluate_vqa(vlm, cfg.eval_questions, limit=cfg.eval_limit, progress=False)
    return {"vqa": result["accuracy"], **{f"vqa.{k}": v for k, v in result["per_kind"].items()}}


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate(path: Path, step: int) -> None:
    """Drop log lines past `step` (a resumed run writes them again)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in keep))


def _save(out: Path, vlm, cfg, opt, sched, step: int, data: str, metrics) -> None:
    training = {"data": str(data), "step": step, "config": dataclasses.asdict(cfg), "metrics": metrics}
    lora = dataclasses.asdict(cfg.lora) if cfg.tune == "lora" else None
    save_vlm(out, vlm, cfg.tune, lora, training)
    state_dir = out / RESUME
    state_dir.mkdir(parents=True, exist_ok=True)
    names = {id(p) for g in opt.param_groups for p in g["params"]}
    weights = {k: v.detach().contiguous() for k, v in vlm.named_parameters() if id(v) in names}
    save_file(weights, str(state_dir / ".trainable.safetensors.tmp"))
    torch.save(
        {
            "step": step,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
        },
        state_dir / ".state.pt.tmp",
    )
    os.replace(state_dir / ".trainable.safetensors.tmp", state_dir / "trainable.safetensors")
    os.replace(state_dir / ".state.pt.tmp", state_dir / "state.pt")


def _load_state(out: Path, vlm, opt, sched) -> int:
    state_dir = out / RESUME
    if not (state_dir / "state.pt").exists():
        return 0
    weights = load_file(str(state_dir / "trainable.safetensors"))
    _, unexpected = vlm.load_state_dict(weights, strict=False)
    if unexpected:
        raise UserError(f"{state_dir}: the saved state does not fit this config (e.g. {unexpected[0]})")
    state = torch.load(state_dir / "state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])

"""Setting up a run: the model (from scratch, a pretrained OpenCLIP start, or a checkpoint of ours), what stays
frozen, the data, the task and the optimizer. Everything the phases of train/loop.py share lives in a `Run`."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.distributed as dist

from retrieval.data.pairs import PairStats
from retrieval.errors import UserError
from retrieval.models.albef import AlbefModel, with_fusion
from retrieval.models.checkpoint import load_dual_encoder, read_config
from retrieval.models.encoders import autocast_dtype, create_clip, resolve_device
from retrieval.models.image_weights import load_image_weights
from retrieval.models.towers import check_towers
from retrieval.train.config import ModelConfig, TrainConfig, pretrained_start
from retrieval.train.data import BatchPlan, PairImages, TrainData, describe_skips, load_groups
from retrieval.train.optim import fused_adamw, lr_lambda, param_groups
from retrieval.train.tasks import ItcItmTask


@dataclass
class Run:
    cfg: TrainConfig
    source: str
    out: Path
    rank: int
    world: int
    device: torch.device
    amp: torch.dtype | None
    model: AlbefModel
    arch: str
    data: Any  # TrainData (in memory) or StreamData (train/stream.py): batches(start) and state()
    task: ItcItmTask
    opt: torch.optim.Optimizer
    sched: Any
    frozen: list[torch.nn.Module]  # modules kept in eval mode while the rest trains
    fusion_trained: bool  # the start brought a trained fusion/ITM head (a checkpoint of ours)
    start_state: (
        dict[str, torch.Tensor] | None
    )  # the start's trained weights (model state dict keys), kept on the
    # CPU for optim.wise < 1: the final checkpoint interpolates towards them
    summary: str  # one line for the log: what was read and skipped

    @property
    def preprocess(self) -> dict[str, Any]:
        return self.model.clip.visual.preprocess_cfg

    @property
    def image_size(self) -> int:
        size = self.model.clip.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed when launched by torchrun; returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def start_clip(mc: ModelConfig, seed: int) -> tuple[torch.nn.Module, str]:
    """(dual encoder, architecture) a run starts from: model.init_checkpoint's, else a new model.arch one (with
    model.pretrained's weights, if any)."""
    if mc.init_checkpoint:
        clip, arch, _ = load_dual_encoder(mc.init_checkpoint)
        return clip, arch
    clip, _ = create_clip(mc.arch, mc.pretrained, seed)
    return clip, mc.arch


def build_model(cfg: TrainConfig) -> tuple[AlbefModel, str, bool]:
    """(model, architecture, whether its fusion came trained). A pretrained start keeps every trained parameter,
    its temperature included; only a model from scratch starts at objectives.temperature."""
    mc = cfg.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        clip, arch = start_clip(mc, cfg.seed)
        if mc.image_weights:
            how = load_image_weights(clip, mc.image_weights)
            log_line(f"image tower from {mc.image_weights} (matched by {how}); text tower from scratch")
        if not pretrained_start(mc):
            with torch.no_grad():
                clip.logit_scale.fill_(math.log(1.0 / cfg.objectives.temperature))
        fusion_trained = (
            bool(mc.init_checkpoint) and "fusion" in read_config(mc.init_checkpoint)["components"]
        )
        # a checkpoint's own fusion encoder, trained weights and shape, is kept; else a fresh one of model.fusion
        model = with_fusion(mc.init_checkpoint, clip) if fusion_trained else AlbefModel(clip, mc.fusion)
    check_towers(clip, arch, itm=cfg.objectives.itm)  # a one-line refusal, not an error mid-step
    return model, arch, fusion_trained


def freeze(model: AlbefModel, which: str) -> list[torch.nn.Module]:
    """Stop gradients into the named towers (model.freeze); returns the modules to keep in eval mode."""
    clip = model.clip
    parts: list[torch.nn.Module] = []
    if which in ("image", "towers"):
        parts.append(clip.visual)
    if which in ("text", "towers"):
        parts.extend(m for name, m in clip.named_children() if name != "visual")
        text_params = [p for name, p in clip.named_parameters(recurse=False) if name != "logit_scale"]
        for p in text_params:  # bare parameters of the text side: positional_embedding, text_projection
            p.requires_grad_(False)
    if which == "towers":
        clip.logit_scale.requires_grad_(False)
    for module in parts:
        module.requires_grad_(False)
    return parts


def setup(source: str, out: Path, cfg: TrainConfig, progress: bool) -> Run:
    rank, world = init_distributed()
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    model, arch, fusion_trained = build_model(cfg)
    if cfg.grad_checkpointing:
        model.clip.set_grad_checkpointing(True)
    frozen = freeze(model, cfg.model.freeze)
    tokenizer = open_clip.get_tokenizer(arch)
    size = model.clip.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    data, summary = _data(source, cfg, tokenizer, size, rank, world, progress and rank == 0)
    task = ItcItmTask(model, cfg.objectives, cfg.seed + rank).to(device)
    groups = param_groups(
        task,
        cfg.optim.weight_decay,
        cfg.optim.lr,
        cfg.optim.lr * cfg.optim.fusion_lr_scale,
        cfg.optim.layer_decay,
        cfg.optim.lr * cfg.optim.image_lr_scale if cfg.model.image_weights else None,
    )
    if not groups:
        raise UserError(
            "model.freeze=towers with objectives.joint_itm=false: nothing trains in the joint run"
        )
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, fused=fused_adamw(device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    amp = autocast_dtype(device, cfg.precision)
    start_state = None
    if cfg.optim.wise < 1 and pretrained_start(cfg.model):
        trained = {
            k: v for k, v in model.state_dict().items() if fusion_trained or not k.startswith("fusion.")
        }
        start_state = {k: v.detach().to("cpu", copy=True) for k, v in trained.items()}
    return Run(
        cfg,
        source,
        out,
        rank,
        world,
        device,
        amp,
        model,
        arch,
        data,
        task,
        opt,
        sched,
        frozen,
        fusion_trained,
        start_state,
        summary,
    )


def _data(source: str, cfg: TrainConfig, tokenizer, size: int, rank: int, world: int, progress: bool):
    from retrieval.data.recolour import choose
    from retrieval.train import stream

    if stream.should_stream(source, cfg):
        data = stream.StreamData(source, cfg, tokenizer, size, rank, world)
        return data, f"streaming {data.describe()}"
    stats = PairStats()
    groups = load_groups(source, stats)
    images = PairImages(groups.images, size, cfg.cache_images, cfg.max_cache_gb, progress)
    plan = BatchPlan(images.valid, cfg.batch_size, cfg.seed, rank, world)
    prob, why = choose(cfg.recolour, cfg.recolour_prob, groups.captions)
    data = TrainData(groups, images, tokenizer, plan, cfg.objectives.text_negatives, prob)
    summary = (
        f"{len(groups)} images, {len(groups.captions)} captions from {source} ({describe_skips(stats, images)}); "
        f"{why}"
    )
    if data.vocabulary is not None:
        summary += f"; {data.vocabulary.describe()}"
    return data, summary


def log_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)

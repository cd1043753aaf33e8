"""Training configuration: one frozen dataclass per component, loaded from a JSON file plus `--set a.b=value`
overrides. Unknown keys and ill-typed values are errors, never silently ignored. The defaults are the tiny preset
that trains on `retrieval data synth` scenes in minutes on 2 CPU cores."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.config import from_dict
from retrieval.errors import UserError
from retrieval.models.fusion import FusionConfig


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "tiny-cvit-64"  # OpenCLIP architecture or preset; this one (conv stem, fixed 2D positions)
    # trains on a CPU in minutes and, unlike the plain tiny-vit-64, learns spatial relations within that budget
    pretrained: str = "none"  # OpenCLIP tag, local weights file, or none (train from scratch)
    init_checkpoint: str | None = (
        None  # start from a checkpoint of ours (fine-tuning); wins over arch/pretrained
    )
    fusion: FusionConfig = field(default_factory=lambda: FusionConfig(width=128, layers=2, heads=4))


@dataclass(frozen=True)
class ObjectiveConfig:
    itc: bool = True  # image-text contrastive (symmetric InfoNCE, learnable temperature)
    itm: bool = True  # image-text matching on the fusion encoder
    itm_weight: float = 1.0  # ITM's share of the total loss
    joint_itm: bool = False  # ITM in the joint run too (ALBEF), its gradients reaching the towers. Off (the
    # default): the fusion encoder learns only in the refinement stage (refine.*, which starts it afresh
    # anyway), on the frozen towers, and a joint step skips the fusion pass, ~30% of it on the tiny preset.
    # Synth seed 0, 600 joint + 1,000 stage steps: t2i R@1 0.553, re-ranked 0.738, binding 0.916 (with joint
    # ITM, 600 joint steps had given 0.537-0.592, re-ranked 0.587-0.667, binding 0.904-0.914)
    negatives: str = "hard"  # ITM negatives: hard (sampled by contrastive similarity, ALBEF) or random
    easy_share: float = 0.5  # share of ITM's mined negatives drawn uniformly rather than by similarity: a
    # fusion encoder from scratch learns nothing from negatives that differ only in binding and sits at the class
    # prior (measured: frozen trained towers, 120 steps: 0.67 acc with pure ALBEF sampling, 0.81 with this at 0.5)
    text_negatives: bool = True  # one rule-made false caption per pair (attributes swapped, relation changed;
    # train/negatives.py) as an extra ITC and ITM negative (NegCLIP). Measured on synth scenes, 800 steps: t2i R@1
    # 0.568 vs 0.511 without, and the image features learn a relation's axis ("left of" vs "above": 0.99 vs 0.76)
    distill: bool = False  # ALBEF momentum distillation: soft ITC targets from an EMA model + feature queue
    alpha: float = 0.4  # weight of the momentum model's soft targets (ALBEF: 0.4)
    momentum: float = 0.995  # EMA decay of the momentum model
    queue_size: int = 2048  # momentum features kept for extra contrastive negatives
    temperature: float = 0.07  # initial temperature (CLIP's); it is learned
    max_logit_scale: float = 100.0  # clamp on 1/temperature, as CLIP does


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # peak AdamW learning rate: tiny models from scratch like it high
    weight_decay: float = 0.05  # not applied to norms, biases, embeddings or the temperature
    warmup_steps: int = 100  # linear warmup, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.02  # floor of the cosine schedule
    grad_clip: float = 1.0  # max grad norm; 0 disables
    betas: tuple[float, float] = (0.9, 0.98)  # CLIP's; 0.98 steadies the contrastive loss
    fusion_lr_scale: float = 1.0  # the fusion encoder's learning rate as a share of lr


@dataclass(frozen=True)
class RefineConfig:
    steps: int = 700  # fusion-only ITM steps after the joint run, towers frozen (train/refine.py); 0: none.
    # ITM starts at chance on a relation's direction; with the mirror and square terms the stage leaves that
    # saddle in 200-300 steps (~0.4 s each) and then ranks both captions and images by it
    batch_size: int = 128  # images per step, each with in-batch, opposite-relation and other false captions;
    # 128 left the direction saddle in about half the steps of 64 at twice the cost per step (seed-0 towers:
    # training direction 0.92 after 800 steps vs 0.64 after 1000)
    lr: float = (
        1e-3  # constant AdamW learning rate of the fusion encoder: the saddle is left sooner at 1e-3 than
    )
    # at 5e-4 (720 joint steps: training direction accuracy 0.74 vs 0.57 after 480 steps), never at 2e-3 in 1000
    itm_weight: float = 2.0  # in-batch ITM cross-entropy, keeps the head calibrated for re-ranking (default
    # model's frozen towers: re-ranked t2i R@1 0.516 at 2.0, 0.480 at 0.5; binding 0.893 vs 0.891)
    relation_weight: float = 4.0  # caption ranked over its opposite-relation twin: the concentrated signal
    # the saddle needs (at 1, beside the binding term, the direction reached 0.68, not 0.93, in 500 steps)
    binding_weight: float = 2.0  # caption ranked over one attribute/noun-swapped twin: keeps binding, and
    # held-out shape swaps need it (synth seed 2, same towers: binding 0.870 at 0.5, 0.912 at 2, 0.918 at 4,
    # shape swaps 0.63 / 0.73 / 0.74; at 4 the direction saddle was left later)
    mirror_weight: float = 4.0  # the caption's image ranked over its mirror twin (train/twins.py) for that
    # caption: the image-side contrast that re-ranking images for a caption needs, and the term that leads the
    # escape from the saddle (training accuracy 0.80 at 430 steps, relation 0.64); 0: not cached or ranked
    square_weight: float = 4.0  # the mirror twin with the opposite-relation caption (a true pair: both
    # directions reversed) ranked over the mirror with the caption and over the image with the twin: the same
    # two contrasts from the square's other corner, for one more fusion row per image. It left the saddle 3x
    # sooner (synth seed 1, same towers: training direction 0.97 after 300 steps; 0.58 without, 0.94 at 900)
    reset_fusion: bool = True  # start the stage from a freshly initialised fusion encoder: the joint run's
    # one has settled on attributes and left the direction saddle slowest (synth seed 1, same towers: reversed
    # relations 0.56 -> 0.93 by ITM, binding 0.80 -> 0.90; it re-learns attribute matching within ~200 steps)
    teacher_sampling: bool = True  # with objectives.distill, pairs are drawn in proportion to the momentum
    # model's belief that they match (losses/distill.py match_belief), not uniformly: ALBEF's pseudo-targets,
    # applied to which captions the stage takes at their word
    max_pairs: int = 8192  # training images whose frozen token states are cached for the stage
    max_cache_gb: float = 1.0  # fewer images are cached when their token states would exceed this


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    steps: int = 600  # optimizer steps (each of batch_size * grad_accum pairs); with the refinement stage
    # ~12 min on 2 CPU cores (synth seeds 2 and 3: 11 min 49 s and 11 min 53 s; ~6.5 min joint, ~5 stage)
    batch_size: int = 96  # pairs per micro-batch; also the contrastive batch on one process
    hard_batches: float = 0.0  # share of each batch filled with lexical neighbours of the rest's captions:
    # random batches rarely hold captions one word apart. Off by default: at 800 steps on synth scenes it changed
    # nothing measurable (t2i R@1 0.331 vs 0.343); worth trying on real data with near-duplicate captions
    # twins: share of each batch that is mirror twins of its other rows: image flipped, "left" <->
    # "right" (and "above" <-> "below" with twins_vertical) swapped in the caption (train/twins.py). Off: in
    # the joint run they did not teach the direction (synth, 720 steps at 0.33: reversed relation 0.53 by ITM)
    # and cost recall (t2i R@1 0.445 vs 0.578); the refinement stage uses mirrors (refine.mirror_weight)
    twins: float = 0.0
    twins_vertical: bool = True  # twins (and refine's mirrors) also flip upside down for captions that say
    # above/below/top/bottom; off for photos, where upside down is not a view the data has
    neighbours: int = 16  # candidates per caption for hard_batches (drawn uniformly among them)
    mine_every: int = 100  # re-mine hard_batches' neighbours with the model every N steps (one pass over the
    # cached training set; before the first, and for streamed data, lexical neighbours); 0: lexical only
    grad_accum: int = 1  # micro-batches per optimizer step (each micro-batch is its own contrastive batch)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or fp32, bf16, fp16
    grad_checkpointing: bool = False  # recompute tower activations in backward: less memory, ~30% slower
    seed: int = 0  # model init, data order and negative sampling all derive from it
    workers: int = 0  # decode processes; 0 with cache_images (decoded once, kept as uint8 in memory)
    cache_images: bool = True  # decode the training images once; refused past max_cache_gb
    max_cache_gb: float = 4.0  # above this the images stream from disk through workers instead
    eval_pairs: str | None = None  # pairs file to evaluate on during training (e.g. heldout.jsonl)
    eval_every: int = 500  # steps between evaluations (and at the end)
    eval_limit: int = 1000  # images of eval_pairs used during training (full eval: `retrieval eval`)
    save_every: int = 250  # steps between resumable checkpoints
    log_every: int = 10  # steps between JSONL log lines
    device: str = "auto"


def _coerce(value: str, hint: Any, key: str) -> Any:
    """Parse a --set value for the field's type: JSON first (numbers, bools, null, lists), else a string."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    origin = typing.get_origin(hint)
    types = (
        typing.get_args(hint)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None))
        else ()
    )
    allowed = tuple(t for t in types if isinstance(t, type)) or ((hint,) if isinstance(hint, type) else ())
    if origin is tuple or tuple in allowed:
        if isinstance(parsed, list):
            return tuple(parsed)
    if float in allowed and isinstance(parsed, int) and not isinstance(parsed, bool):
        return float(parsed)
    if allowed and not isinstance(parsed, allowed):
        if str in allowed:
            return value
        raise UserError(f"--set {key}={value}: expected {hint}, got {type(parsed).__name__}")
    return parsed


def _set(data: dict[str, Any], cls: type, dotted: str, value: str) -> None:
    keys = dotted.split(".")
    node, node_cls = data, cls
    for i, key in enumerate(keys):
        fields = {f.name: f for f in dataclasses.fields(node_cls)}
        if key not in fields:
            where = ".".join(keys[:i]) or "config"
            raise UserError(f"--set {dotted}: {where} has no key {key!r}; known: {', '.join(sorted(fields))}")
        hint = typing.get_type_hints(node_cls)[key]
        if i == len(keys) - 1:
            node[key] = _coerce(value, hint, dotted)
        else:
            if not dataclasses.is_dataclass(hint):
                raise UserError(f"--set {dotted}: {key} is not a section")
            node = node.setdefault(key, {})
            node_cls = hint


def load_train_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: cannot read the config ({e})") from e
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item}: expected key=value, e.g. objectives.negatives=random")
        key, value = item.split("=", 1)
        _set(data, TrainConfig, key.strip(), value.strip())
    cfg = from_dict(TrainConfig, data)
    if cfg.objectives.negatives not in ("hard", "random"):
        raise UserError(f"objectives.negatives={cfg.objectives.negatives!r}: expected hard or random")
    if not (cfg.objectives.itc or cfg.objectives.itm):
        raise UserError("objectives: enable at least one of itc, itm")
    if cfg.objectives.itm and not cfg.objectives.itc:
        raise UserError("objectives.itm needs itc: ITM mines its negatives from the contrastive similarities")
    if not 0 <= cfg.objectives.easy_share <= 1:
        raise UserError(f"objectives.easy_share={cfg.objectives.easy_share}: must be in [0, 1]")
    if not 0 <= cfg.hard_batches < 1 or cfg.neighbours < 1 or cfg.mine_every < 0:
        raise UserError(
            f"hard_batches={cfg.hard_batches}, neighbours={cfg.neighbours}, mine_every={cfg.mine_every}: need "
            "0 <= hard_batches < 1, neighbours >= 1 and mine_every >= 0"
        )
    if not 0 <= cfg.twins < 1 or cfg.batch_size - round(cfg.twins * cfg.batch_size) < 2:
        raise UserError(
            f"twins={cfg.twins}: must be in [0, 1) and leave at least 2 rows of batch_size for the plan"
        )
    r = cfg.refine
    if cfg.objectives.itm and not cfg.objectives.joint_itm and r.steps == 0:
        raise UserError(
            "objectives.joint_itm=false with refine.steps=0: the ITM head would never train; "
            "set refine.steps > 0, objectives.joint_itm=true, or objectives.itm=false"
        )
    if r.steps < 0 or r.batch_size < 2 or r.max_pairs < 2 or r.lr <= 0 or r.max_cache_gb <= 0:
        raise UserError(
            f"refine.steps={r.steps}, batch_size={r.batch_size}, max_pairs={r.max_pairs}, lr={r.lr}, "
            f"max_cache_gb={r.max_cache_gb}: need steps >= 0, batch_size >= 2, max_pairs >= 2, lr > 0, max_cache_gb > 0"
        )
    return cfg

"""Training configuration: one frozen dataclass per component, loaded from a JSON file plus `--set a.b=value`
overrides. Unknown keys and ill-typed values are errors, never silently ignored. The defaults are the tiny preset
that trains on `retrieval data synth` scenes in minutes on 2 CPU cores."""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.config import from_dict
from retrieval.errors import UserError
from retrieval.models.captioner import CaptionerConfig
from retrieval.models.fusion import FusionConfig

FREEZE = ("none", "image", "text", "towers")
TASKS = ("itc_itm", "caption")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "tiny-cvit-64"  # OpenCLIP architecture or preset; this one (conv stem, fixed 2D positions)
    # trains on a CPU in minutes and learns spatial relations within that budget
    pretrained: str = "none"  # OpenCLIP tag, local weights file, or none (train from scratch)
    init_checkpoint: str | None = None  # a checkpoint of ours to fine-tune; wins over arch/pretrained
    image_weights: str = ""  # a weights file for the image tower alone (e.g. an ImageNet timm trunk) under a
    # text tower from scratch (models/image_weights.py); the tower then trains at optim.image_lr_scale * lr
    freeze: str = "none"  # none | image (LiT: a locked image tower) | text | towers (only the fusion trains)
    fusion: FusionConfig = field(default_factory=lambda: FusionConfig(width=128, layers=2, heads=4))


@dataclass(frozen=True)
class ObjectiveConfig:
    itc: bool = True  # image-text contrastive (symmetric InfoNCE, learnable temperature)
    itm: bool = True  # image-text matching on the fusion encoder
    itm_weight: float = 1.0  # ITM's share of the total loss
    joint_itm: bool = False  # ITM in every joint step too (ALBEF); off: the fusion learns in the refinement
    # stage on the frozen towers, and a joint step skips the fusion pass
    negatives: str = "hard"  # ITM negatives: hard (sampled by contrastive similarity, ALBEF) or random
    easy_share: float = 0.5  # share of ITM's mined negatives drawn uniformly: a fusion trained from scratch
    # learns nothing when every negative differs from the positive only in binding
    text_negatives: bool = True  # one rule-made false caption per pair as an extra ITC and ITM negative
    # (NegCLIP; train/negatives.py): binding and relations that random batches never contrast
    distill: bool = False  # ALBEF momentum distillation: soft ITC targets from an EMA model + feature queue
    alpha: float = 0.4  # weight of the momentum model's soft targets (ALBEF: 0.4)
    momentum: float = 0.995  # EMA decay of the momentum model
    queue_size: int = 2048  # momentum features kept for extra contrastive negatives
    temperature: float = 0.07  # initial temperature from scratch (CLIP's), then learned; a pretrained start
    # keeps its own
    max_logit_scale: float = 100.0  # clamp on 1/temperature, as CLIP does


@dataclass(frozen=True)
class OptimConfig:
    preset: str = "auto"  # auto: finetune for a pretrained start (a tag, a weights file, a checkpoint of
    # ours), else scratch; the finetune preset (FINETUNE below) lowers the rates, and set values win over it
    lr: float = 1e-3  # peak AdamW learning rate: tiny models from scratch like it high
    weight_decay: float = 0.05  # not applied to norms, biases, embeddings or the temperature
    warmup_steps: int = 100  # linear warmup, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.02  # floor of the cosine schedule
    grad_clip: float = 1.0  # max grad norm; 0 disables
    betas: tuple[float, float] = (0.9, 0.98)  # CLIP's; 0.98 steadies the contrastive loss
    fusion_lr_scale: float = 1.0  # the fusion encoder's learning rate as a share of lr
    image_lr_scale: float = 0.1  # the image tower's learning rate as a share of lr when it starts from
    # model.image_weights: a pretrained trunk keeps its features while the fresh text tower catches up
    layer_decay: float = 1.0  # layer-wise decay (BEiT): block k of n at lr * layer_decay^(n - k); 1: off
    wise: float = 1.0  # share of the fine-tuned weights in the final checkpoint; below 1 they are averaged
    # with the start's (WiSE-FT, Wortsman et al. 2022), which keeps most of what the start knew


@dataclass(frozen=True)
class RefineConfig:
    steps: int = 1000  # fusion-only ITM steps after the joint run, towers frozen (train/refine.py); 0: none
    batch_size: int = 128  # images per step, each with in-batch, opposite-relation and other false captions
    lr: float = 1e-3  # constant AdamW learning rate of the fusion encoder
    itm_weight: float = 2.0  # in-batch ITM cross-entropy: keeps the head calibrated for re-ranking
    binding_weight: float = 2.0  # caption ranked over one attribute/noun-swapped twin (negatives.py)
    relation_terms: str = "auto"  # auto | on | off: the relation, mirror and square terms, which need
    # captions naming a spatial relation; auto: on when relation_share of them name one the relation lexicon
    # reads, or (any wording) say left or right
    relation_share: float = 0.3  # share of captions (either kind, counted apart) that turns relation_terms on
    relation_weight: float = 4.0  # caption ranked over its opposite-relation twin: a relation's direction
    mirror_weight: float = 4.0  # the caption's image ranked over its mirror twin (train/twins.py)
    square_weight: float = 4.0  # the mirror with the opposite-relation caption (a true pair) ranked over the
    # mirror with the caption and over the image with the twin: the same contrasts from the other corner
    vertical_mirrors: str = "auto"  # auto | on | off: mirrors also flip upside down for above/below captions;
    # auto: only when the relation terms are on (photos are never upside down)
    reset_fusion: bool = True  # start the stage from a fresh fusion encoder (the finetune preset keeps the
    # start checkpoint's trained one)
    teacher_sampling: bool = True  # with objectives.distill, draw pairs in proportion to the momentum
    # model's belief that they match (losses/distill.py match_belief), not uniformly
    neighbour_share: float = 0.0  # share of a step's images drawn as the cached images the contrastive model
    # ranks highest for another row's caption (its confusers over the whole cache, not only the batch), so
    # in-batch ITM mining meets the mistakes re-ranking must correct
    neighbours: int = 8  # confusers kept per cached caption
    max_pairs: int = 8192  # training images whose frozen token states are cached for the stage
    max_cache_gb: float = 1.0  # fewer images are cached when their token states would exceed this


@dataclass(frozen=True)
class TrainConfig:
    task: str = "itc_itm"  # itc_itm: the retrieval model (ITC + ITM); caption: the captioner (objective lm,
    # train/caption.py), its image tower from model.init_checkpoint or model.arch
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    caption: CaptionerConfig = field(default_factory=CaptionerConfig)  # the captioner (task=caption)
    steps: int = 800  # optimizer steps (each of batch_size * grad_accum images); with the refinement stage
    # about 11 minutes on 2 idle CPU cores (docs/training.md)
    batch_size: int = 96  # images per micro-batch, each with one of its captions; the contrastive batch
    grad_accum: int = 1  # micro-batches per optimizer step (each micro-batch is its own contrastive batch)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or fp32, bf16, fp16
    grad_checkpointing: bool = False  # recompute tower activations in backward: less memory, ~30% slower
    seed: int = 0  # model init, data order and negative sampling all derive from it
    stream: str = "auto"  # auto | memory | stream: hold the pairs in memory, or stream them through
    # DataLoader workers (train/stream.py), memory flat; auto streams WebDataset shards
    workers: int = 2  # DataLoader decode processes when streaming
    shuffle_buffer: int = 2048  # samples each streaming worker shuffles among
    # auto | on | off: recolour training images and their colour words together (data/recolour.py) so
    # colour/shape combinations the data lacks are seen; auto: on when most captions name a colour (synth scenes,
    # product shots), never for photo captions in general; in memory and streamed
    recolour: str = "auto"
    # share of training rows recoloured when on (joint steps, refinement cache); the captioner has its own,
    # caption.recolour_prob. A higher share costs re-ranking here (+3.6 against +7.9, docs/training.md)
    recolour_prob: float = 0.5
    cache_images: bool = True  # in memory: decode the training images once, kept as uint8
    max_cache_gb: float = 4.0  # above this the in-memory images are decoded per batch instead
    eval_pairs: str | None = None  # pairs to evaluate on during training (e.g. heldout.jsonl), step 0 too
    eval_every: int = 500  # steps between evaluations (and at the end)
    eval_limit: int = 1000  # images of eval_pairs used during training (full eval: `retrieval eval`)
    save_every: int = 250  # steps between resumable checkpoints
    log_every: int = 10  # steps between JSONL log lines
    device: str = "auto"


# The finetune preset: what a pretrained start gets under optim.preset=auto (or =finetune), unless set. Small
# rates keep what the model knew (CLIP fine-tuning recipes: lr ~1e-5 to 1e-4 with warmup), the final weights
# are averaged with the start's (WiSE-FT), the trained fusion is kept, and the refinement is shorter.
FINETUNE: dict[str, Any] = {
    "steps": 300,
    "optim": {"lr": 5e-5, "warmup_steps": 30, "weight_decay": 0.1, "min_lr_ratio": 0.1, "wise": 0.5},
    "refine": {"steps": 200, "lr": 1e-4, "reset_fusion": False},
}


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


def config_data(cls: type, path: str | Path | None, overrides: Sequence[str], example: str) -> dict[str, Any]:
    """A JSON config file (or nothing) with `--set key=value` overrides applied, checked against the dataclass
    `cls`; `example` is a valid override, shown when one is malformed."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: cannot read the config ({e})") from e
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item}: expected key=value, e.g. {example}")
        key, value = item.split("=", 1)
        _set(data, cls, key.strip(), value.strip())
    return data


def load_train_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    data = config_data(TrainConfig, path, overrides, "objectives.negatives=random")
    cfg = from_dict(TrainConfig, _with_preset(data))
    _check(cfg)
    return cfg


def pretrained_start(model: ModelConfig) -> bool:
    return bool(model.init_checkpoint) or model.pretrained not in ("none", "", None)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def _with_preset(data: dict[str, Any]) -> dict[str, Any]:
    """The file's and --set's values over the preset they choose (optim.preset, or what the start implies)."""
    preset = data.get("optim", {}).get("preset", "auto")
    if preset not in ("auto", "scratch", "finetune"):
        raise UserError(f"optim.preset={preset!r}: expected auto, scratch or finetune")
    if preset == "auto":
        model = from_dict(ModelConfig, data.get("model", {}), "model")
        # a captioner's decoder always starts fresh, whatever its image tower starts from
        preset = "finetune" if pretrained_start(model) and data.get("task") != "caption" else "scratch"
    base = FINETUNE if preset == "finetune" else {}
    return _merged(_merged(base, data), {"optim": {"preset": preset}})


def _check(cfg: TrainConfig) -> None:
    if cfg.task not in TASKS:
        raise UserError(f"task={cfg.task!r}: expected one of {', '.join(TASKS)}")
    if cfg.objectives.negatives not in ("hard", "random"):
        raise UserError(f"objectives.negatives={cfg.objectives.negatives!r}: expected hard or random")
    if not (cfg.objectives.itc or cfg.objectives.itm):
        raise UserError("objectives: enable at least one of itc, itm")
    if cfg.objectives.itm and not cfg.objectives.itc:
        raise UserError("objectives.itm needs itc: ITM mines its negatives from the contrastive similarities")
    if not 0 <= cfg.objectives.easy_share <= 1:
        raise UserError(f"objectives.easy_share={cfg.objectives.easy_share}: must be in [0, 1]")
    if cfg.model.freeze not in FREEZE:
        raise UserError(f"model.freeze={cfg.model.freeze!r}: expected one of {', '.join(FREEZE)}")
    if cfg.stream not in ("auto", "memory", "stream") or cfg.workers < 0 or cfg.shuffle_buffer < 1:
        raise UserError(
            f"stream={cfg.stream!r}, workers={cfg.workers}, shuffle_buffer={cfg.shuffle_buffer}: need stream "
            "auto, memory or stream, workers >= 0, shuffle_buffer >= 1"
        )
    if not 0 < cfg.optim.wise <= 1:
        raise UserError(
            f"optim.wise={cfg.optim.wise}: must be in (0, 1] (1: the fine-tuned weights as they are)"
        )
    if cfg.model.image_weights and cfg.model.init_checkpoint:
        raise UserError(
            "model.image_weights with model.init_checkpoint: the checkpoint brings its own image tower; drop one"
        )
    if not 0 <= cfg.optim.image_lr_scale:
        raise UserError(f"optim.image_lr_scale={cfg.optim.image_lr_scale}: must be >= 0")
    if not 0 < cfg.optim.layer_decay <= 1:
        raise UserError(f"optim.layer_decay={cfg.optim.layer_decay}: must be in (0, 1]")
    modes = {
        "refine.relation_terms": cfg.refine.relation_terms,
        "refine.vertical_mirrors": cfg.refine.vertical_mirrors,
        "recolour": cfg.recolour,
        "caption.mirror": cfg.caption.mirror,
    }
    for key, value in modes.items():
        if value not in ("auto", "on", "off"):
            raise UserError(f"{key}={value!r}: expected auto, on or off")
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

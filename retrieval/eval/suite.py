"""Everything `retrieval eval` measures on one checkpoint, in one report: recall on held-out pairs
(evaluate.py), attribute binding on caption + negative-caption triples (binding.py) and zero-shot
classification on a folder per class (zeroshot.py). The model is loaded once; the fusion (ITM) component only
when something reads it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import open_clip
import torch

from retrieval.errors import UserError
from retrieval.eval.binding import BindingConfig, evaluate_binding, load_triples
from retrieval.eval.evaluate import EvalConfig, Report, evaluate
from retrieval.eval.zeroshot import ZeroShotConfig, evaluate_zero_shot, load_templates, scan_classes
from retrieval.models.encoders import resolve_device


@dataclass(frozen=True)
class SuiteConfig:
    pairs: str | None = None  # held-out pairs: recall@K, re-ranking, and binding on synth rows
    binding: str | None = None  # triples file; when given, its binding replaces the synth rows' one
    zero_shot: str | None = None  # folder with one subfolder of images per class
    device: str = "auto"
    recall: EvalConfig = field(default_factory=EvalConfig)
    triples: BindingConfig = field(default_factory=BindingConfig)
    classes: ZeroShotConfig = field(default_factory=ZeroShotConfig)


def evaluate_checkpoint(checkpoint: str | os.PathLike, cfg: SuiteConfig) -> Report:
    """One flat report: the recall keys ("t2i.R@1", ...), "binding*" and "zeroshot.*"."""
    from retrieval.data.pairs import load_pairs
    from retrieval.models.albef import has_fusion, with_fusion
    from retrieval.models.checkpoint import load_dual_encoder

    if not (cfg.pairs or cfg.binding or cfg.zero_shot):
        raise UserError("nothing to evaluate: pass held-out PAIRS, --binding TRIPLES or --zero-shot FOLDER")
    if cfg.zero_shot:  # bad input fails here, before a model is loaded
        load_templates(cfg.classes.templates), scan_classes(cfg.zero_shot)
    triples, skipped = load_triples(cfg.binding, cfg.triples.images_root) if cfg.binding else ([], 0)
    pairs = load_pairs(cfg.pairs) if cfg.pairs else None
    device = resolve_device(cfg.device)
    clip, arch, _ = load_dual_encoder(checkpoint)
    clip = clip.to(device)
    size = clip.visual.image_size
    inputs = {
        "image_size": int(size[0] if isinstance(size, (tuple, list)) else size),
        "mean": clip.visual.preprocess_cfg["mean"],
        "std": clip.visual.preprocess_cfg["std"],
        "tokenizer": open_clip.get_tokenizer(arch),
        "device": device,
    }
    report: Report = {}
    if pairs is not None or triples:
        itc_only = (
            pairs is not None and not triples and not cfg.recall.rerank_k and not has_fusion(checkpoint)
        )
        # a checkpoint without an ITM head (objectives.itm=false) still has its ITC recall; re-ranking and
        # binding need the head, and with_fusion says so in one line
        model = _ItcOnly(clip) if itc_only else with_fusion(checkpoint, clip).to(device)
        if pairs is not None:
            recall = replace(cfg.recall, binding=cfg.recall.binding and not triples and not itc_only)
            report.update(evaluate(model, pairs, recall, **inputs))
        if triples:
            found = evaluate_binding(model, triples, cfg.triples, **inputs)
            report.update({**found, "binding.skipped_triples": skipped})
    if cfg.zero_shot:
        report.update(evaluate_zero_shot(clip, cfg.zero_shot, cfg.classes, **inputs))
    return report


class _ItcOnly(torch.nn.Module):
    """What recall@K reads of a model when there is no fusion encoder: the dual encoder and its temperature."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

"""Zero-shot classification on a folder-per-class dataset, the CLIP way (as CLIP_benchmark measures it): each
class name is put into every prompt template, the prompts' text features are averaged into one class embedding,
and an image is classified by its nearest class embedding. Top-1 / top-5 accuracy.

    FOLDER/golden_retriever/*.jpg   class "golden retriever" (underscores read as spaces)
    FOLDER/tabby_cat/...            images anywhere below a class folder belong to it

Only the dual encoder is used, so any checkpoint (ITM trained or not) and any OpenCLIP tower family works.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.data.pairs import FOLDER_IMAGE_EXTS, Pair
from retrieval.errors import UserError
from retrieval.eval.scoring import Tokenizer, encode_images, encode_texts, evaluating

Template = Callable[[str], str]  # class name -> prompt


@dataclass(frozen=True)
class ZeroShotConfig:
    templates: str = "openai"  # prompt set: "openai" (CLIP's 80 ImageNet prompts, CLIP_benchmark's default),
    # "simple" (open_clip's 7), "plain" (the class name alone), or a text file of templates, one per line with {c}
    batch_size: int = 128  # images or prompts per encoder pass
    ks: tuple[int, ...] = (1, 5)  # top-K accuracies reported


def load_templates(spec: str) -> list[Template]:
    """A named prompt set, or a file of templates ('a photo of a {c}.'), one per line."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    named = {
        "openai": OPENAI_IMAGENET_TEMPLATES,
        "simple": SIMPLE_IMAGENET_TEMPLATES,
        "plain": (lambda c: c,),
    }
    if spec in named:
        return list(named[spec])
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--templates {spec!r}: not one of {', '.join(named)} and not a file of templates")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [line for line in lines if "{c}" not in line]
    if not lines or bad:
        example = bad[0] if bad else "(the file is empty)"
        raise UserError(
            f"{path}: every line must be a template with {{c}} for the class name, e.g. {example!r}"
        )
    # str.replace, not str.format: a template from a file must not reach attributes of the class name
    return [lambda c, line=line: line.replace("{c}", c) for line in lines]


def scan_classes(folder: str | os.PathLike) -> tuple[list[str], list[Pair]]:
    """(class names in sorted folder order, one Pair per image with its class index in extra["label"])."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{folder}: not a folder; --zero-shot takes a folder with one subfolder per class")
    names: list[str] = []
    images: list[Pair] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = sorted(
            os.path.join(d, f)
            for d, _, files in os.walk(sub)
            for f in files
            if os.path.splitext(f)[1].lower() in FOLDER_IMAGE_EXTS
        )
        if found:
            images += [Pair(path, path, "", {"label": len(names)}) for path in found]
            names.append(sub.name.replace("_", " "))
    if len(names) < 2:
        raise UserError(
            f"{folder}: found {len(names)} class folder(s) with images; zero-shot needs at least 2"
        )
    return names, images


def class_embeddings(texts: Tensor, n_classes: int) -> Tensor:
    """texts (C * T, D) L2-normalised prompt features, class-major -> (C, D): each class's mean, renormalised."""
    per_class = texts.view(n_classes, -1, texts.shape[-1])  # (C, T, D)
    return F.normalize(per_class.mean(dim=1), dim=-1)  # (C, D)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """scores (N, C), labels (N,) long -> {"acc@K": share of images whose class is among their top K}. Ties count
    against the image (as recall_at_k does): a class scored as high as the true one ranks above it, so a collapsed
    model gets chance, not whatever the class order gives. K is clipped to C."""
    if scores.dim() != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(
            f"need scores (N, C) and labels (N,); got {tuple(scores.shape)}, {tuple(labels.shape)}"
        )
    true = scores.gather(1, labels.unsqueeze(1))  # (N, 1)
    rank = (scores >= true).sum(dim=1) - 1  # (N,) classes at or above the true one, itself excluded
    n = len(labels)
    return {f"acc@{k}": int((rank < min(k, scores.shape[1])).sum()) / n for k in ks}


def evaluate_zero_shot(
    clip: nn.Module,
    folder: str | os.PathLike,
    cfg: ZeroShotConfig,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    tokenizer: Tokenizer,
    device: torch.device,
) -> dict[str, float | int]:
    """ "zeroshot.acc@1", "zeroshot.acc@5", "zeroshot.n_images", "zeroshot.n_classes", "zeroshot.skipped_images"
    for the OpenCLIP model `clip` (put in eval mode and restored afterwards)."""
    templates = load_templates(cfg.templates)
    names, candidates = scan_classes(folder)
    with evaluating(clip):
        prompts = [template(name) for name in names for template in templates]  # class-major
        texts = encode_texts(clip, tokenizer, prompts, device, cfg.batch_size, keep_tokens=False)
        classes = class_embeddings(texts.feat, len(names))  # (C, D)
        gallery, images = encode_images(
            clip, candidates, image_size, mean, std, device, cfg.batch_size, keep_tokens=False
        )
        scores = images.feat @ classes.T  # (N, C)
    labels = torch.tensor([pair.extra["label"] for pair in gallery], device=scores.device)
    result = {f"zeroshot.{k}": v for k, v in topk_accuracy(scores, labels, cfg.ks).items()}
    return {
        **result,
        "zeroshot.n_images": len(gallery),
        "zeroshot.n_classes": len(names),
        "zeroshot.skipped_images": len(candidates) - len(gallery),
    }

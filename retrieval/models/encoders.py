"""OpenCLIP dual encoders: any architecture, a pretrained tag, a local weights file, seeded random init, or a
checkpoint directory written by this toolkit. Images and texts come out L2-normalised in one vector space.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch

from retrieval.config import EncoderConfig
from retrieval.errors import RuntimeFailure, UserError
from retrieval.models import towers
from retrieval.models.loading import cached_digest, load_text_weights, skip_init
from retrieval.models.source import model_source
from retrieval.models.stems import STEMS_FILE, apply_conv_stem, preset_stem

PRESET_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(PRESET_DIR)


def list_presets() -> list[str]:
    """Our own architectures (tiny, train in minutes on a CPU); they are registered with open_clip on import."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json") if p != STEMS_FILE)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device}: expected auto, cpu or cuda[:N]")
    return torch.device(device)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """None means: run in fp32 without autocast (always the case on the CPU)."""
    if precision == "fp32" or device.type != "cuda":
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    if precision in ("fp16", "auto"):
        return torch.float16
    raise UserError(f"precision {precision!r}: expected auto, fp32, fp16 or bf16")


def file_digest(path: str | os.PathLike) -> str:
    """The weights identity of a file: blake2b-128 of its bytes, remembered by (path, size, mtime) (loading.py)."""
    return cached_digest(path)


def check_arch(arch: str) -> None:
    if arch in open_clip.list_models():
        return
    close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else " See `open_clip.list_models()`."
    raise UserError(f"unknown model architecture {arch!r}.{hint}")


_PRESET = object()  # create_untrained's default: the stem the preset declares (stems.py)


def create_untrained(
    arch: str, stem: tuple[int, ...] | None | object = _PRESET, init: bool = True
) -> torch.nn.Module:
    """open_clip.create_model without weights, minus its "no pretrained weights loaded" warning: random init (or
    weights loaded right after, from a checkpoint) is the point here, and the warning only alarms users.
    stem: conv stem channels, None for none, or by default whatever the preset `arch` declares.
    init=False: no random init (loading.skip_init), for a caller that loads every weight it will use next."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with skip_init() if not init else contextlib.nullcontext():
            # pretrained_text=False: a Hugging Face text tower starts random too, not fetched from the hub
            model = open_clip.create_model(arch, pretrained=None, pretrained_text=False)
    finally:
        logging.disable(previous)
    channels = preset_stem(arch) if stem is _PRESET else stem
    return apply_conv_stem(model, channels) if channels else model


def create_clip(arch: str, pretrained: str = "none", seed: int = 0) -> tuple[torch.nn.Module, str]:
    """Build an OpenCLIP model on the CPU; returns (model, weights identity for manifests)."""
    check_arch(arch)
    if pretrained in ("none", "", None):
        # fork_rng: seeding must not leak into the caller's random state
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create_untrained(arch)
        return model, f"random-init:seed={seed}"
    if os.path.isfile(pretrained):
        try:
            # every weight is loaded from the file (strictly): no random init before it
            if preset_stem(arch):  # open_clip would build the patchify layer the weights do not fit
                model = create_untrained(arch, init=False)
                open_clip.load_checkpoint(model, pretrained, weights_only=True)
            else:
                with skip_init():
                    model = open_clip.create_model(arch, pretrained=pretrained, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to read the file is bad input
            raise UserError(
                f"{pretrained}: cannot load as weights for {arch}: {str(e).splitlines()[0]}"
            ) from e
        return model, f"file:{file_digest(pretrained)}"
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained not in tags:
        known = ", ".join(tags) or "none published"
        raise UserError(
            f"--pretrained {pretrained!r}: not a file and not a pretrained tag of {arch} (tags: {known})"
        )
    from retrieval.models.weights import ensure_fetchable

    ensure_fetchable(arch, pretrained)  # offline: fail now, naming the ways out, not after hub time-outs
    try:
        with skip_init():  # the published checkpoint holds every weight (open_clip loads it strictly)
            model = open_clip.create_model(arch, pretrained=pretrained)
    except Exception as e:  # noqa: BLE001 - typically the network
        raise RuntimeFailure(
            f"cannot fetch pretrained weights {arch}/{pretrained} ({str(e).splitlines()[0][:120]}); "
            "offline, pass a local weights file with --pretrained FILE"
        ) from e
    return model, f"openclip:{pretrained}"


def normalize(pixels: torch.Tensor, mean, std, device: torch.device) -> torch.Tensor:
    """uint8 (or [0, 1] float) (B, 3, S, S) -> the model's normalised float input on `device`. Pixels travel as
    uint8 until here: 4x less memory and IPC than floats."""
    x = pixels.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()  # (B, 3, S, S)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


@dataclass
class Encoder:
    """A dual encoder ready for inference: images in as uint8 batches, normalised float32 features out."""

    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    amp_dtype: torch.dtype | None
    identity: dict[str, Any] = field(default_factory=dict)
    text_only: bool = False  # loaded without its image tower's weights (a text query needs none)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def embed_dim(self) -> int:
        return int(self.identity["embed_dim"])

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) -> normalised float (B, 3, S, S) on the device. Workers ship uint8: 4x less IPC."""
        cfg = self.model.visual.preprocess_cfg
        return normalize(images, cfg["mean"], cfg["std"], self.device)

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.text_only:
            raise RuntimeError("this encoder was loaded for text only (load_encoder(text_only=True))")
        x = self._pixels(images)  # (B, 3, S, S)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            feats = self.model.encode_image(x)  # (B, D)
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)  # (B, L)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            feats = self.model.encode_text(tokens)  # (B, D)
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()


def text_clip(arch: str, pretrained: str) -> tuple[torch.nn.Module, str] | None:
    """create_clip for text queries: from a local weights file only the text side is read, the image tower left
    uninitialised. None where that does not apply (random init, a tag, a file needing open_clip's conversions)."""
    if not os.path.isfile(pretrained) or preset_stem(arch):
        return None
    check_arch(arch)
    model = create_untrained(arch, init=False)
    return (model, f"file:{file_digest(pretrained)}") if load_text_weights(model, pretrained) else None


def model_identity(model: torch.nn.Module, arch: str, weights: str) -> dict[str, Any]:
    """What must match for two sets of vectors to be comparable (written to collection manifests)."""
    cfg = model.visual.preprocess_cfg
    size = model.visual.image_size
    return {
        "arch": arch,
        "weights": weights,
        "embed_dim": towers.embed_dim(model),
        "image_size": int(size[0] if isinstance(size, (tuple, list)) else size),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "resize": "shortest-side-bicubic+center-crop",
    }


def load_encoder(cfg: EncoderConfig, text_only: bool = False) -> Encoder:
    """The one entry point every pipeline uses to get a dual encoder. text_only: a checkpoint of ours or a local
    weights file is loaded without its image tower's weights (a text search needs none; encode_images then
    refuses); random init and pretrained tags load in full."""
    device = resolve_device(cfg.device)
    if cfg.checkpoint:
        from retrieval.models.checkpoint import (
            load_dual_encoder,  # local import: checkpoint imports this module
        )

        model, arch, weights = load_dual_encoder(cfg.checkpoint, text_only=text_only)
    else:
        arch = cfg.arch
        loaded = text_clip(arch, cfg.pretrained) if text_only else None
        text_only = loaded is not None
        model, weights = loaded or create_clip(arch, cfg.pretrained, cfg.seed)
    model = model.to(device).eval()
    identity = model_identity(model, arch, weights)
    # how to rebuild this encoder later (search reads it from the manifest); not part of the comparison
    identity["source"] = {**model_source(cfg), "arch": arch}
    return Encoder(
        model=model,
        tokenizer=open_clip.get_tokenizer(arch),
        device=device,
        amp_dtype=autocast_dtype(device, cfg.precision),
        identity=identity,
        text_only=text_only,
    )

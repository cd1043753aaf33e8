"""A convolutional stem for OpenCLIP's VisionTransformer: "early convolutions help transformers see better".

A ViT's patchify layer is one strided convolution, so where things are relative to each other ("a red circle to
the left of a blue square") must be learned by attention from a position table trained from scratch. On
generated scenes the tiny ViT needed 300 fully supervised steps to tell a horizontal pair from a vertical one
(0.83 held-out accuracy); with this stem of three stride-2 3x3 convolutions in its place it was at 0.99 after
150 (the probe's step time within 5%; a whole training step is slower, see the README's training speed). In
contrastive training the patchify tower never learned relations at all within the 15-minute budget (a linear
probe on its image features read the axis at chance).

OpenCLIP's configs have no place for a stem, so it lives beside them: presets name theirs in `configs/stems.json`,
checkpoints record theirs in config.json ("vision_stem"), and `apply_conv_stem` swaps it into a built model.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from torch import Tensor, nn

STEMS_FILE = Path(__file__).parent / "configs" / "stems.json"  # {"preset name": [channels, ...]}


class ConvStem(nn.Module):
    """(B, 3, H, W) -> (B, width, H / 2^k, W / 2^k): k stride-2 3x3 conv + GroupNorm + GELU blocks, then a 1x1
    projection to the transformer's width. GroupNorm, not BatchNorm: no batch statistics, so a training step,
    evaluation and a process of a multi-process run all compute the same function."""

    def __init__(self, channels: tuple[int, ...], width: int, groups: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 3
        for c in channels:
            layers += [
                nn.Conv2d(previous, c, 3, stride=2, padding=1, bias=False),
                nn.GroupNorm(min(groups, c), c),
                nn.GELU(),
            ]
            previous = c
        layers.append(nn.Conv2d(previous, width, 1))
        self.channels = tuple(channels)
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


@functools.cache
def _preset_stems() -> dict[str, list[int]]:
    return json.loads(STEMS_FILE.read_text()) if STEMS_FILE.is_file() else {}  # read once per process


def preset_stem(arch: str) -> tuple[int, ...] | None:
    """The stem channels a preset of ours declares, or None (every OpenCLIP architecture, most presets)."""
    channels = _preset_stems().get(arch)
    return tuple(channels) if channels else None


def stem_channels(model: nn.Module) -> tuple[int, ...] | None:
    """What to record in a checkpoint: the channels of the model's conv stem, or None for a patchify ViT."""
    conv1 = getattr(getattr(model, "visual", None), "conv1", None)
    return conv1.channels if isinstance(conv1, ConvStem) else None


def apply_conv_stem(model: nn.Module, channels: tuple[int, ...]) -> nn.Module:
    """Replace the patchify convolution of an OpenCLIP VisionTransformer by a ConvStem of the same stride."""
    visual = getattr(model, "visual", None)
    patchify = getattr(visual, "conv1", None)
    if not isinstance(patchify, nn.Conv2d) or not hasattr(visual, "transformer"):
        raise ValueError("a conv stem needs an OpenCLIP VisionTransformer (visual.conv1 patchify layer)")
    stride = patchify.stride[0]
    if 2 ** len(channels) != stride or patchify.stride[0] != patchify.stride[1]:
        raise ValueError(f"a stem of {len(channels)} stride-2 blocks cannot replace a patch size of {stride}")
    visual.conv1 = ConvStem(tuple(channels), patchify.out_channels)
    return model

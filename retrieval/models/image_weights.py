"""Pretrained weights for the image tower alone (`model.image_weights`): an ImageNet-trained trunk under a text
tower that trains from scratch, the LiT / "pretrained backbone" start when no image-text model of the
architecture exists.

The file is a state dict (.safetensors, or a torch file read with weights_only=True) of the tower's trunk: a
timm model's own keys for an OpenCLIP timm tower (`visual.trunk`), or OpenCLIP `visual.*` keys for its other
towers. Prefixes that checkpoints commonly add (`module.`, `model.`, `visual.`, `trunk.`) are stripped. A file
from another code base with other names for the same network (the EfficientNet-PyTorch layout, say) is read by
position instead (a torch file: safetensors keeps no order, so its names must match): accepted only when every tensor the tower needs lines up, in order and in shape, with one of
the file's, and whatever is left over is a classifier head. Anything else is a one-line error naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from open_clip.timm_model import TimmModel
from torch import nn

from retrieval.errors import UserError

_PREFIXES = ("module.", "model.", "visual.", "trunk.")
_HEAD_WORDS = ("fc", "classifier", "head.fc", "head")  # names a leftover classifier head may carry


def target(clip: nn.Module) -> nn.Module:
    """The module whose weights an image weights file holds: a timm tower's trunk, else the whole tower."""
    visual = clip.visual
    return visual.trunk if isinstance(visual, TimmModel) else visual


def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"model.image_weights {path}: no such file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a file we cannot read is bad input
        raise UserError(
            f"model.image_weights {path}: not a weights file ({str(e).splitlines()[0][:100]})"
        ) from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.image_weights {path}: expected a state dict of tensors")
    return state


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def _by_position(
    state: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor], path: str
) -> dict[str, torch.Tensor]:
    src = list(state.items())
    if len(src) < len(wanted):
        raise UserError(
            f"model.image_weights {path}: {len(src)} tensors, the image tower needs {len(wanted)}; "
            "not weights of this architecture"
        )
    mapped: dict[str, torch.Tensor] = {}
    # the file may hold more tensors than the tower (a classifier head): the leftovers are checked below
    for (src_name, tensor), (name, like) in zip(src, wanted.items(), strict=False):
        if tensor.shape != like.shape:
            raise UserError(
                f"model.image_weights {path}: {src_name} {tuple(tensor.shape)} does not fit {name} "
                f"{tuple(like.shape)}; not weights of this architecture"
            )
        mapped[name] = tensor
    extra = [n for n, _ in src[len(wanted) :]]
    if any(not any(w in n.lower() for w in _HEAD_WORDS) for n in extra):
        raise UserError(f"model.image_weights {path}: {len(extra)} tensors left over ({extra[0]}, ...)")
    return mapped


def load_image_weights(clip: nn.Module, path: str | os.PathLike) -> str:
    """Load `path` into the image tower of `clip` in place; returns how it was matched ("names" or
    "position"), for the run log."""
    module = target(clip)
    wanted = module.state_dict()
    state = {_strip(k): v for k, v in read_state(path).items()}
    if set(wanted) <= set(state):
        how, mapped = "names", {k: state[k] for k in wanted}
        bad = [k for k in wanted if mapped[k].shape != wanted[k].shape]
        if bad:
            raise UserError(
                f"model.image_weights {path}: {bad[0]} is {tuple(mapped[bad[0]].shape)}, the tower's "
                f"{tuple(wanted[bad[0]].shape)}; not weights of this architecture"
            )
    elif Path(path).suffix == ".safetensors":
        missing = next(k for k in wanted if k not in state)
        raise UserError(
            f"model.image_weights {path}: no tensor named {missing}; a .safetensors file must use the tower's "
            "names (its key order is not kept, so it cannot be read by position)"
        )
    else:
        how, mapped = "position", _by_position(state, wanted, str(path))
    module.load_state_dict(mapped, strict=True)
    return how

"""Checkpoint directories (DESIGN.md "Checkpoints"): config.json plus one safetensors file per component.

    DIR/config.json              {"format": "retrieval-checkpoint", "version": 1, "arch": ..., "model_cfg": {...},
                                  "vision_stem": [channels] or null (models/stems.py),
                                  "components": {"dual_encoder": "dual_encoder.safetensors", ...}, ...}
    DIR/dual_encoder.safetensors the OpenCLIP model's state dict
    DIR/<component>.safetensors  fusion/ITM, captioner, projector: whatever was trained

No pickles anywhere: weights are safetensors, everything else is JSON. Files are written to a temporary name and
renamed into place, config.json last, so a crash mid-save never leaves a directory that loads half-written weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_model

from retrieval.errors import UserError
from retrieval.models.encoders import file_digest
from retrieval.models.loading import is_visual, load_safetensors
from retrieval.models.stems import stem_channels

FORMAT = "retrieval-checkpoint"
VERSION = 1
DUAL_ENCODER = "dual_encoder"


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def save_component(directory: str | os.PathLike, name: str, module: torch.nn.Module) -> str:
    """Write one component's weights; returns the file name to list in config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    filename = f"{name}.safetensors"
    tmp = directory / f".{filename}.tmp"
    save_model(module, str(tmp))  # save_model (not save_file) copes with tied/shared tensors
    os.replace(tmp, directory / filename)
    return filename


def save_checkpoint(
    directory: str | os.PathLike,
    arch: str,
    components: dict[str, torch.nn.Module],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save `components` (must include 'dual_encoder', an OpenCLIP model of architecture `arch`)."""
    if DUAL_ENCODER not in components:
        raise ValueError("a checkpoint needs a 'dual_encoder' component")
    directory = Path(directory)
    files = {name: save_component(directory, name, module) for name, module in components.items()}
    config = {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch,
        "model_cfg": open_clip.get_model_config(arch),
        "vision_stem": stem_channels(components[DUAL_ENCODER]),
        "tokenizer": {"kind": "open_clip", "arch": arch},
        "components": files,
        **(extra or {}),
    }
    _write_json_atomic(directory / "config.json", config)
    return directory


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise UserError(
            f"{directory}: not a checkpoint directory (no config.json); train one with `retrieval train`"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e
    if config.get("format") != FORMAT:
        raise UserError(f"{path}: not a retrieval checkpoint (format={config.get('format')!r})")
    if int(config.get("version", 0)) > VERSION:
        raise UserError(
            f"{path}: checkpoint version {config['version']} is newer than this toolkit; upgrade it"
        )
    return config


def _register_arch(arch: str, model_cfg: dict[str, Any]) -> str:
    """A checkpoint carries its architecture, so it loads even where the arch was never registered, or where a
    newer toolkit changed what the name means (then it is registered under a name of its own). Returns the name
    to build it by."""
    if arch in open_clip.list_models():
        if open_clip.get_model_config(arch) == model_cfg:
            return arch
        digest = hashlib.blake2b(json.dumps(model_cfg, sort_keys=True).encode(), digest_size=6).hexdigest()
        arch = f"{arch}@{digest}"
        if arch in open_clip.list_models():
            return arch
    # open_clip reads the file into its registry at once; a removed folder is skipped by its later rescans
    with tempfile.TemporaryDirectory(prefix="retrieval-arch-") as tmp:
        (Path(tmp) / f"{arch}.json").write_text(json.dumps(model_cfg))
        open_clip.add_model_config(tmp)
    return arch


def load_component(
    directory: str | os.PathLike,
    name: str,
    module: torch.nn.Module,
    skip: Callable[[str], bool] | None = None,
) -> torch.nn.Module:
    """Load a component's weights into `module`, strictly; skip: names neither read nor expected."""
    config = read_config(directory)
    filename = config["components"].get(name)
    if filename is None:
        have = ", ".join(sorted(config["components"]))
        raise UserError(f"{directory}: checkpoint has no {name!r} component (it has: {have})")
    state = load_safetensors(Path(directory) / filename, (lambda k: not skip(k)) if skip else None)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if skip is not None:
        missing = [k for k in missing if not skip(k)]
    if missing or unexpected:
        raise UserError(
            f"{directory}/{filename}: weights do not fit the model (missing {len(missing)}, unexpected "
            f"{len(unexpected)}, e.g. {(missing or unexpected)[0]})"
        )
    return module


def load_dual_encoder(
    directory: str | os.PathLike, text_only: bool = False
) -> tuple[torch.nn.Module, str, str]:
    """Returns (OpenCLIP model on the CPU, architecture name, weights identity). text_only: the image tower's
    weights are not read (its tensors stay uninitialised: for text queries only)."""
    config = read_config(directory)
    arch = config["arch"]
    build = _register_arch(arch, config["model_cfg"])
    from retrieval.models.encoders import create_untrained  # here: encoders imports this module

    stem = config.get("vision_stem")  # absent in checkpoints older than stems: they had none
    model = create_untrained(build, tuple(stem) if stem else None, init=False)  # every weight is loaded next
    load_component(directory, DUAL_ENCODER, model, skip=is_visual if text_only else None)
    weights = f"checkpoint:{file_digest(Path(directory) / config['components'][DUAL_ENCODER])}"
    return model, arch, weights

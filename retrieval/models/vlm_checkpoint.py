"""VLM checkpoint directories: what was trained, with which vision tower and which LLM.

    DIR/config.json              {"format": "retrieval-vlm", "vision": {"source", "arch", "weights"} or null,
                                  "llm": {"name", "digest"}, "connector": {...}, "prompt": {...}, "image": {...},
                                  "tune": frozen|lora|full, "lora": {...}, "components": {...}, "training": {...}}
    DIR/connector.safetensors    the connector (and the xattn blocks)
    DIR/lora.safetensors         the LoRA adapters (tune=lora) | DIR/llm.safetensors the whole LLM (tune=full)

The vision tower and the LLM are recorded by where they came from and a digest of their weights; loading with
another one (moved files may be named with --vision / --llm) is refused with one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from retrieval.config import from_dict
from retrieval.errors import UserError
from retrieval.models.llm import load_llm
from retrieval.models.loading import load_safetensors
from retrieval.models.projector import ConnectorConfig, build_connector
from retrieval.models.vlm import PromptConfig, Vlm

FORMAT = "retrieval-vlm"


def load_vision(source: str | None) -> tuple[torch.nn.Module | None, dict[str, Any] | None]:
    """A vision tower: a checkpoint directory of ours, or an OpenCLIP 'ARCH' / 'ARCH:TAG-or-file'; (model, identity)."""
    if not source:
        return None, None
    if Path(source, "config.json").is_file():
        from retrieval.models.checkpoint import load_dual_encoder

        model, arch, weights = load_dual_encoder(source)
    else:
        from retrieval.models.encoders import create_clip

        arch, _, tag = source.partition(":")
        model, weights = create_clip(arch, tag or "none")
    return model.eval(), {"source": str(source), "arch": arch, "weights": weights}


def vision_grid(vision: torch.nn.Module | None) -> tuple[int | None, int | None, int, dict[str, Any]]:
    """(token width, grid side, image size, preprocessing) of a tower; None for no tower (patches)."""
    if vision is None:
        return None, None, 64, {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    from retrieval.models.towers import encode_image_tokens

    size = vision.visual.image_size
    side = int(size[0] if isinstance(size, (tuple, list)) else size)
    with torch.no_grad():
        tokens = encode_image_tokens(vision, torch.zeros(1, 3, side, side))[1]  # (1, N, Wv)
    grid = int(round(tokens.shape[1] ** 0.5))
    cfg = vision.visual.preprocess_cfg
    return (
        tokens.shape[-1],
        grid if grid * grid == tokens.shape[1] else None,
        side,
        {
            "mean": [float(v) for v in cfg["mean"]],
            "std": [float(v) for v in cfg["std"]],
        },
    )


def build_vlm(
    llm_name: str, vision_source: str | None, connector: ConnectorConfig, prompt: PromptConfig
) -> Vlm:
    """A fresh VLM: the connector initialised, the LLM and the tower as loaded."""
    vision, vision_id = load_vision(vision_source) if connector.type != "patches" else (None, None)
    llm = load_llm(llm_name)
    width, grid, side, pre = vision_grid(vision)
    module = build_connector(connector, width, grid, llm.width, side)
    vlm = Vlm(llm, module, vision, prompt, {"size": side, **pre})
    vlm.vision_identity = vision_id
    return vlm


def save_vlm(directory: str | os.PathLike, vlm: Vlm, tune: str, lora: dict | None, training: dict) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    parts = {"connector": {f"connector.{k}": v for k, v in vlm.connector.state_dict().items()}}
    if vlm.xattn is not None:
        parts["connector"].update({f"xattn.{k}": v for k, v in vlm.xattn.state_dict().items()})
    if tune == "lora":
        parts["lora"] = {k: v for k, v in vlm.llm.state_dict().items() if "lora_" in k}
    elif tune == "full":
        parts["llm"] = dict(vlm.llm.state_dict())
    files = {}
    for name, state in parts.items():
        tmp = out / f".{name}.safetensors.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
        os.replace(tmp, out / f"{name}.safetensors")
        files[name] = f"{name}.safetensors"
    config = {
        "format": FORMAT,
        "version": 1,
        "vision": vlm.vision_identity,
        "llm": vlm.llm_identity,
        "connector": dataclasses.asdict(vlm.connector.cfg),
        "prompt": dataclasses.asdict(vlm.prompt),
        "image": vlm.image,
        "tune": tune,
        "lora": lora,
        "components": files,
        "training": training,
    }
    tmp = out / ".config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, out / "config.json")
    return out


def read_vlm_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(
            f"{directory}: not a VLM checkpoint ({type(e).__name__}); train one with --task vlm"
        ) from e
    if config.get("format") != FORMAT:
        raise UserError(
            f"{directory}: not a VLM checkpoint (format={config.get('format')!r}); train one with --task vlm"
        )
    return config


def load_vlm(directory: str | os.PathLike, llm: str | None = None, vision: str | None = None) -> Vlm:
    """Load a VLM checkpoint; llm / vision: where its LLM / tower are now, which must be the ones it was trained
    with (same weights digest), else UserError."""
    config = read_vlm_config(directory)
    recorded = config["vision"]
    tower, tower_id = load_vision(vision or (recorded or {}).get("source")) if recorded else (None, None)
    if recorded and tower_id["weights"] != recorded["weights"]:
        raise UserError(
            f"{directory} was trained with the vision tower {recorded['source']} ({recorded['weights']}); "
            f"{tower_id['source']} is another one ({tower_id['weights']})"
        )
    model = load_llm(llm or config["llm"]["name"])
    if model.identity["digest"] != config["llm"]["digest"]:
        raise UserError(
            f"{directory} was trained with the LLM {config['llm']['name']} (digest {config['llm']['digest'][:12]}); "
            f"{model.identity['name']} is another one (digest {model.identity['digest'][:12]})"
        )
    model.identity = dict(config["llm"])
    connector_cfg = recorded_connector(config)
    width, grid, side, _ = vision_grid(tower)
    connector = build_connector(connector_cfg, width, grid, model.width, config["image"]["size"])
    vlm = Vlm(model, connector, tower, from_dict(PromptConfig, config["prompt"], "prompt"), config["image"])
    vlm.vision_identity = recorded
    if config["tune"] == "lora":
        from retrieval.train.lora import add_lora

        add_lora(vlm.llm, config["lora"])
    load_weights(vlm, directory, check=False)
    return vlm.eval()


def recorded_connector(config: dict[str, Any]) -> ConnectorConfig:
    """A checkpoint's connector; one written before connector positions existed was trained without them."""
    return from_dict(ConnectorConfig, {"positions": False, **config["connector"]}, "connector")


def load_weights(vlm: Vlm, directory: str | os.PathLike, check: bool = True) -> Vlm:
    """Load a checkpoint's trained parts (connector, xattn, LoRA or LLM weights) into `vlm`; check: the
    checkpoint's LLM and vision tower must be `vlm`'s."""
    config = read_vlm_config(directory)
    if check:
        if config["llm"]["digest"] != vlm.llm_identity["digest"]:
            raise UserError(
                f"{directory} was trained with the LLM {config['llm']['name']}, not {vlm.llm_identity['name']}"
            )
        theirs, ours = (config["vision"] or {}).get("weights"), (vlm.vision_identity or {}).get("weights")
        if theirs != ours:
            raise UserError(f"{directory} was trained with another vision tower ({theirs}, this run: {ours})")
        if recorded_connector(config) != vlm.connector.cfg:
            raise UserError(f"{directory} has another connector ({config['connector']['type']})")
    for name, filename in config["components"].items():
        state = load_safetensors(Path(directory) / filename)
        for prefix, module in (("connector.", vlm.connector), ("xattn.", vlm.xattn)):
            part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if part and module is not None:
                module.load_state_dict(part)
        if name in ("lora", "llm"):
            if (
                check
                and config["tune"] == "lora"
                and not any("lora_" in k for k, _ in vlm.llm.named_parameters())
            ):
                raise UserError(f"{directory} holds LoRA adapters: set tune=lora to continue from it")
            _, unexpected = vlm.llm.load_state_dict(state, strict=False)
            if unexpected:
                raise UserError(f"{directory}/{filename}: weights do not fit the LLM (e.g. {unexpected[0]})")
    return vlm

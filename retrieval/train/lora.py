"""LoRA adapters on the LLM through peft, injected in place (module names stay those of the LLM)."""

from __future__ import annotations

from typing import Any

from torch import nn


def add_lora(llm: nn.Module, cfg: dict[str, Any]) -> list[nn.Parameter]:
    """Add adapters of rank cfg['rank'] on cfg['targets'] (projection names); returns the new parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=int(cfg["rank"]),
        lora_alpha=float(cfg["alpha"]),
        target_modules=list(cfg["targets"]),
        lora_dropout=0.0,
    )
    inject_adapter_in_model(config, llm)
    return [p for name, p in llm.named_parameters() if "lora_" in name]

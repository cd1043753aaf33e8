"""Configuration of `retrieval train --task vlm`: one frozen dataclass, loaded like TrainConfig (a JSON file plus
--set overrides; unknown keys are errors). The defaults are the acceptance recipe: SmolLM2-135M frozen, an
mlp2x_gelu connector, stage 2 on synth VQA rows within 30 minutes on 2 CPU cores (docs/vlm.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from retrieval.config import from_dict
from retrieval.errors import UserError
from retrieval.models.projector import ConnectorConfig
from retrieval.models.vlm import PromptConfig

TUNE = ("frozen", "lora", "full")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8  # adapter rank: small, the task is narrow
    alpha: float = 16.0  # scale alpha / rank, peft's usual 2x
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # Llama projection names (GPT-2: c_attn)


@dataclass(frozen=True)
class VlmTrainConfig:
    llm: str = "smollm2-135m"  # preset (models/llm.py), hub name, local folder or .gguf file
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    tune: str = (
        "frozen"  # stage 2: frozen (connector alone) | lora | full; stage 1 always trains the connector alone
    )
    lora: LoraConfig = field(default_factory=LoraConfig)
    init_checkpoint: str | None = None  # a VLM checkpoint whose connector (and adapters) to start from, e.g.
    # stage 1 or a frozen-LLM run before a LoRA stage 2; its LLM and tower must be the ones of this run
    stage1_steps: int = 100  # steps on caption rows (skipped when the data has none)
    steps: int = 2000  # steps on question rows (skipped when the data has none); the time budget ends sooner
    batch_size: int = 8  # images per step, each with up to `turns` of its questions in one chat
    turns: int = 5  # stage 2: questions per image per chat (multi-turn, as LLaVA trains): the image tokens
    # and the system prompt are paid once for several answers
    lr: float = 2e-3  # peak AdamW rate of the connector: it starts from nothing and the LLM is fixed
    llm_lr: float = 5e-5  # the LLM's rate for tune=lora or full; 2e-4 for 429 LoRA steps overwrote plain-text
    # answers, 5e-5 kept them and still raised VQA (docs/vlm.md)
    warmup_steps: int = 30  # linear warmup, then cosine to min_lr_ratio * lr
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    time_budget_min: float = 28.0  # > 0: stop after this many minutes of training, the schedule's cosine
    # following elapsed time (whichever of time and steps is further along); a budgeted run resumes, not exactly
    precision: str = "bf16"  # bf16 autocast through the LLM (faster on CPUs with bf16 support) or fp32
    threads: int = 0  # torch CPU threads; 0: torch's default
    recolour: str = (
        "auto"  # auto | on | off: train on recoloured copies of the images with their colour words
    )
    # swapped to match (data/recolour.py), so colour/shape combinations the data lacks are seen; auto: on when
    # most texts name a colour
    recolour_prob: float = 1.0  # share of a batch's images drawn as a recoloured copy when on: all of them,
    # so no colour predicts a shape and the answer must come from the image (docs/vlm.md: 0.685 -> 0.710)
    recolour_variants: int = 8  # recoloured copies per image, their tower outputs cached like the image's own
    seed: int = 0
    log_every: int = 10
    save_every: int = 100
    eval_questions: str | None = (
        None  # VQA rows to score during training (exact match), e.g. vqa_heldout.jsonl
    )
    eval_every: int = 300
    eval_limit: int = 500  # rows of eval_questions used during training


def load_vlm_config(path: str | Path | None = None, overrides: list[str] = ()) -> VlmTrainConfig:
    from retrieval.train.config import config_data

    data = config_data(VlmTrainConfig, path, overrides, "connector.type=resampler")
    cfg = from_dict(VlmTrainConfig, data)
    if cfg.tune not in TUNE:
        raise UserError(f"tune={cfg.tune!r}: expected one of {', '.join(TUNE)}")
    if cfg.precision not in ("bf16", "fp32"):
        raise UserError(f"precision={cfg.precision!r}: expected bf16 or fp32")
    if cfg.steps < 0 or cfg.stage1_steps < 0 or cfg.batch_size < 1 or cfg.turns < 1 or cfg.lr <= 0:
        raise UserError("steps and stage1_steps must be >= 0, batch_size >= 1, lr > 0")
    return cfg

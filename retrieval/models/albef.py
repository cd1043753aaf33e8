"""The ALBEF-style retrieval model: an OpenCLIP dual encoder (ITC) plus a fusion encoder whose text tokens attend
to the image's patch tokens (ITM). Also the token-level encoders the fusion needs, which OpenCLIP's
encode_image/encode_text (pooled only) don't expose."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

from retrieval.models.fusion import FusionConfig, FusionEncoder, build_fusion

PAD_ID = 0  # OpenCLIP's SimpleTokenizer pads with 0; SOT (first token) is where ITM reads its [CLS]


@dataclass
class Encoded:
    image_feat: Tensor  # (B, D) L2-normalised
    text_feat: Tensor  # (B, D) L2-normalised
    image_tokens: Tensor  # (B, N, Wv) patch tokens (+ class token) after the final norm
    text_tokens: Tensor  # (B, L', Wt) token states after ln_final, trailing all-padding columns dropped
    text_mask: Tensor  # (B, L') bool, True for real tokens
    negative_feat: Tensor | None = None  # (B, D) L2-normalised features of generated false captions
    negative_tokens: Tensor | None = None  # (B, L', Wt) their token states
    negative_mask: Tensor | None = None  # (B, L') bool


def encode_image_tokens(clip: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """images (B, 3, S, S) normalised -> (pooled projected (B, D), tokens (B, N, Wv))."""
    visual = clip.visual
    visual.output_tokens = True
    try:
        pooled, tokens = visual(images)  # (B, D), (B, N, Wv)
    finally:
        visual.output_tokens = False
    return pooled, tokens


def trimmed_length(clip: nn.Module, text: Tensor) -> int:
    """How many leading positions of `text` (B, L) the text tower must run to give exactly its full-length
    outputs: up to the longest text in the batch when the tower is causal and pools a token inside the text
    (argmax/EOT, eos or first), since then positions after it never reach an earlier one; else all L."""
    if getattr(clip, "attn_mask", None) is None or clip.text_pool_type not in ("argmax", "eos", "first"):
        return text.shape[1]
    real = (text != PAD_ID).any(dim=0).nonzero()  # columns holding a real token in some row
    return int(real.max()) + 1 if len(real) else 1


def encode_text_tokens(clip: nn.Module, text: Tensor, trim: bool = False) -> tuple[Tensor, Tensor]:
    """text (B, L) ids -> (pooled projected (B, D), token states (B, L', Wt)). Mirrors CLIP.encode_text.

    trim=True drops the trailing columns that are padding in every row (see trimmed_length; the result is the
    same, for L' <= L): synth captions fill half of a 32-token context, so training runs the text tower and the
    fusion encoder on half the tokens. The caller slices its mask with `text[:, :L']`.
    """
    length = trimmed_length(clip, text) if trim else text.shape[1]
    text = text[:, :length]  # (B, L')
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(text).to(cast_dtype)  # (B, L', Wt)
    x = x + clip.positional_embedding[:length].to(cast_dtype)
    mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
    x = clip.transformer(x, attn_mask=mask)
    tokens = clip.ln_final(x)  # (B, L, Wt)
    pooled = text_global_pool(
        tokens, text, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None)
    )
    if isinstance(clip.text_projection, nn.Linear):
        pooled = clip.text_projection(pooled)
    else:
        pooled = pooled @ clip.text_projection  # (B, D)
    return pooled, tokens


class AlbefModel(nn.Module):
    def __init__(self, clip: nn.Module, fusion_cfg: FusionConfig):
        super().__init__()
        self.clip = clip
        image_width = clip.visual.transformer.width
        text_width = clip.transformer.width
        self.fusion_cfg = dataclasses.replace(fusion_cfg, image_width=image_width, text_width=text_width)
        self.fusion: FusionEncoder = build_fusion(self.fusion_cfg)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def encode(self, images: Tensor, text: Tensor, negative_text: Tensor | None = None) -> Encoded:
        """negative_text (B, L): generated false captions, encoded in the same text pass (one trimmed length)."""
        b = text.shape[0]
        image_feat, image_tokens = encode_image_tokens(self.clip, images)
        all_text = text if negative_text is None else torch.cat([text, negative_text])  # (B or 2B, L)
        text_feat, text_tokens = encode_text_tokens(self.clip, all_text, trim=True)  # (., D), (., L', Wt)
        text_feat = F.normalize(text_feat, dim=-1)
        mask = all_text[:, : text_tokens.shape[1]] != PAD_ID  # (., L')
        enc = Encoded(F.normalize(image_feat, dim=-1), text_feat[:b], image_tokens, text_tokens[:b], mask[:b])
        if negative_text is not None:
            enc.negative_feat, enc.negative_tokens, enc.negative_mask = (
                text_feat[b:],
                text_tokens[b:],
                mask[b:],
            )
        return enc

    def itm_logits(
        self, text_tokens: Tensor, text_mask: Tensor, image_tokens: Tensor, image_index: Tensor | None = None
    ) -> Tensor:
        return self.fusion.itm_logits(text_tokens, text_mask, image_tokens, image_index)  # (B, 2)

    def momentum_copy(self) -> AlbefModel:
        """A frozen EMA twin for momentum distillation (ALBEF)."""
        twin = copy.deepcopy(self)
        for p in twin.parameters():
            p.requires_grad_(False)
        return twin


@torch.no_grad()
def itm_match_prob(
    model: AlbefModel,
    text_tokens: Tensor,
    text_mask: Tensor,
    image_tokens: Tensor,
    image_index: Tensor | None = None,
) -> Tensor:
    """(B,) probability that text i matches image i (image image_index[i] when given), the score ITM
    re-ranking sorts by."""
    return model.itm_logits(text_tokens, text_mask, image_tokens, image_index).float().softmax(-1)[:, 1]


def load_albef(directory) -> tuple[AlbefModel, str]:
    """A trained checkpoint with a fusion/ITM component -> (AlbefModel on the CPU, architecture)."""
    from retrieval.models.checkpoint import load_dual_encoder

    clip, arch, _ = load_dual_encoder(directory)
    return with_fusion(directory, clip), arch


def with_fusion(directory, clip: nn.Module) -> AlbefModel:
    """The checkpoint's fusion/ITM component on top of its dual encoder `clip`, already loaded (e.g. by the
    encoder a search uses), so the towers are not read from disk twice."""
    from retrieval.config import from_dict
    from retrieval.errors import UserError
    from retrieval.models.checkpoint import load_component, read_config

    config = read_config(directory)
    if "fusion" not in config.get("components", {}):
        raise UserError(
            f"{directory}: this checkpoint has no ITM head (fusion): it was trained with objectives.itm=false, or "
            "with objectives.joint_itm=false and stopped before the refinement stage (retrieval train --resume)"
        )
    # checkpoints written before an option existed behave as then: first-token readout, no image positions
    fusion = {"readout": "first", "image_positions": False, **config.get("fusion", {})}
    model = AlbefModel(clip, from_dict(FusionConfig, fusion, "fusion"))
    load_component(directory, "fusion", model.fusion)
    return model.eval()

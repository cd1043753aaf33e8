"""The ALBEF-style retrieval model: an OpenCLIP dual encoder (ITC) plus a fusion encoder whose text tokens attend
to the image's patch tokens (ITM). The token states the fusion reads come from towers.py, for every tower
family OpenCLIP builds."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.models import towers
from retrieval.models.fusion import FusionConfig, FusionEncoder, build_fusion
from retrieval.models.towers import (  # noqa: F401 - PAD_ID, trimmed_length: re-exported for callers
    PAD_ID,
    TowerError,
    encode_image_tokens,
    encode_text_tokens,
    text_mask,
    token_widths,
    trimmed_length,
)


@dataclass
class Encoded:
    image_feat: Tensor  # (B, D) L2-normalised
    text_feat: Tensor  # (B, D) L2-normalised
    image_tokens: Tensor | None  # (B, N, Wv) patch tokens after the final norm; None: towers without them
    text_tokens: Tensor | None  # (B, L', Wt) token states after the final norm, trailing padding dropped
    text_mask: Tensor | None  # (B, L') bool, True for real tokens
    negative_feat: Tensor | None = None  # (B, D) L2-normalised features of generated false captions
    negative_tokens: Tensor | None = None  # (B, L', Wt) their token states
    negative_mask: Tensor | None = None  # (B, L') bool


class AlbefModel(nn.Module):
    def __init__(self, clip: nn.Module, fusion_cfg: FusionConfig):
        super().__init__()
        self.clip = clip
        try:
            image_width, text_width = token_widths(clip)
            self.reads_tokens = True
        except TowerError:  # ITC only (train/ refuses ITM at its start): the fusion is never called
            image_width, text_width = fusion_cfg.image_width, fusion_cfg.text_width
            self.reads_tokens = False
        self.fusion_cfg = dataclasses.replace(
            fusion_cfg, image_width=image_width, text_width=text_width, global_width=towers.embed_dim(clip)
        )
        self.fusion: FusionEncoder = build_fusion(self.fusion_cfg)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @property
    def embed_dim(self) -> int:
        """Width of the shared space: the size of a feature queue, of an index's vectors."""
        return towers.embed_dim(self.clip)

    def encode(self, images: Tensor, text: Tensor, negative_text: Tensor | None = None) -> Encoded:
        """negative_text (B, L): generated false captions, encoded in the same text pass (one trimmed length)."""
        b = text.shape[0]
        all_text = text if negative_text is None else torch.cat([text, negative_text])  # (B or 2B, L)
        if not self.reads_tokens:
            image_feat = self.clip.encode_image(images, normalize=True)  # (B, D)
            text_feat = self.clip.encode_text(all_text, normalize=True)  # (B or 2B, D)
            enc = Encoded(image_feat, text_feat[:b], None, None, None)
            if negative_text is not None:
                enc.negative_feat = text_feat[b:]
            return enc
        image_feat, image_tokens = encode_image_tokens(self.clip, images)
        text_feat, text_tokens = encode_text_tokens(self.clip, all_text, trim=True)  # (., D), (., L', Wt)
        text_feat = F.normalize(text_feat, dim=-1)
        mask = text_mask(self.clip, all_text[:, : text_tokens.shape[1]])  # (., L')
        enc = Encoded(F.normalize(image_feat, dim=-1), text_feat[:b], image_tokens, text_tokens[:b], mask[:b])
        if negative_text is not None:
            enc.negative_feat, enc.negative_tokens, enc.negative_mask = (
                text_feat[b:],
                text_tokens[b:],
                mask[b:],
            )
        return enc

    def itm_logits(
        self,
        text_tokens: Tensor,
        text_mask: Tensor,
        image_tokens: Tensor,
        image_index: Tensor | None = None,
        image_global: Tensor | None = None,
    ) -> Tensor:
        """(B, 2) match logits. image_global (B or M, D): the images' pooled features, read when
        fusion_cfg.global_token is on."""
        return self.fusion.itm_logits(text_tokens, text_mask, image_tokens, image_index, image_global)

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
    image_global: Tensor | None = None,
) -> Tensor:
    """(B,) probability that text i matches image i (image image_index[i] when given), the score ITM
    re-ranking sorts by. image_global: the images' pooled features (see AlbefModel.itm_logits)."""
    logits = model.itm_logits(text_tokens, text_mask, image_tokens, image_index, image_global)  # (B, 2)
    return logits.float().softmax(-1)[:, 1]


def load_albef(directory) -> tuple[AlbefModel, str]:
    """A trained checkpoint with a fusion/ITM component -> (AlbefModel on the CPU, architecture)."""
    from retrieval.models.checkpoint import load_dual_encoder

    clip, arch, _ = load_dual_encoder(directory)
    return with_fusion(directory, clip), arch


def has_fusion(directory) -> bool:
    """Whether a checkpoint saved a fusion/ITM component."""
    from retrieval.models.checkpoint import read_config

    return "fusion" in read_config(directory).get("components", {})


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
    # checkpoints written before an option existed behave as then: first-token readout, no image positions, no
    # pooled-feature token
    fusion = {"readout": "first", "image_positions": False, "global_token": False, **config.get("fusion", {})}
    model = AlbefModel(clip, from_dict(FusionConfig, fusion, "fusion"))
    load_component(directory, "fusion", model.fusion)
    return model.eval()

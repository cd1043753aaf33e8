"""Training tasks: modules whose forward returns a dict of losses. The loop knows no specific loss.

ItcItmTask is ALBEF's recipe on an OpenCLIP dual encoder: ITC (symmetric InfoNCE, learnable temperature,
optionally with momentum distillation) + ITM on the fusion encoder with negatives mined from the ITC similarities,
plus (objectives.text_negatives, NegCLIP) one generated false caption per pair as an extra negative of both.
With objectives.joint_itm off (the default) the joint step is ITC alone and the fusion encoder trains afterwards,
in the refinement stage on the frozen towers (train/refine.py).
The whole computation lives in forward() so that DistributedDataParallel sees every parameter it must reduce.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from retrieval.losses.contrastive import (
    clamp_logit_scale,
    clip_loss,
    gather_features,
    gather_ids,
    local_block,
)
from retrieval.losses.distill import FeatureQueue, distilled_clip_loss, momentum_update
from retrieval.losses.mining import same_id_mask
from retrieval.models.albef import AlbefModel
from retrieval.train.config import ObjectiveConfig
from retrieval.train.itm import itm_forward


class ItcItmTask(nn.Module):
    def __init__(self, model: AlbefModel, cfg: ObjectiveConfig, seed: int = 0):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.momentum_model: AlbefModel | None = None
        self.queue: FeatureQueue | None = None
        if cfg.distill:
            self.momentum_model = model.momentum_copy()
            dim = model.embed_dim
            self.queue = FeatureQueue(dim, cfg.queue_size)
        # negative sampling has its own generator: its state is checkpointed, so a resumed run mines the same
        self.sampler = torch.Generator().manual_seed(seed + 17)

    def forward(
        self,
        images: Tensor,
        text: Tensor,
        ids: Tensor,
        negative_text: Tensor | None = None,
        negative_valid: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """images (B, 3, S, S) normalised, text (B, L) token ids, ids (B,) caption ids (equal = positive);
        negative_text (B, L) generated false captions and negative_valid (B,) bool (objectives.text_negatives)."""
        cfg = self.cfg
        if not cfg.text_negatives:
            negative_text = negative_valid = None
        enc = self.model.encode(images, text, negative_text)
        scale = self.model.logit_scale.exp()
        out: dict[str, Tensor] = {}
        if self.momentum_model is not None:
            with torch.no_grad():
                momentum_update(self.model, self.momentum_model, cfg.momentum)
                m_image = self.momentum_model.clip.encode_image(images, normalize=True)  # (B, D)
                m_text = self.momentum_model.clip.encode_text(text, normalize=True)  # (B, D)
                m_negative = None
                if negative_text is not None:
                    m_negative = self.momentum_model.clip.encode_text(negative_text, normalize=True)  # (B, D)
            itc = distilled_clip_loss(
                enc.image_feat,
                enc.text_feat,
                m_image,
                m_text,
                self.queue,
                scale,
                cfg.alpha,
                image_ids=ids,
                negative_text=enc.negative_feat,
                m_negative_text=m_negative,
                negative_valid=negative_valid,
            )
            sim_i2t, sim_t2i = itc["sim_i2t"], itc["sim_t2i"]  # (B, B)
            with torch.no_grad():
                g_image, g_text = gather_features(m_image, m_text)  # the queue holds the global batch
                self.queue.enqueue(g_image, g_text, gather_ids(ids))
        else:
            itc = clip_loss(
                enc.image_feat,
                enc.text_feat,
                scale,
                image_ids=ids,
                negative_text=enc.negative_feat,
                negative_valid=negative_valid,
            )
            sim_i2t, sim_t2i = local_block(itc["sim_i2t"]), local_block(itc["sim_t2i"])  # (B, B)
        out["itc"] = itc["itc"]
        loss = itc["itc"]
        if cfg.itm and cfg.joint_itm:
            itm = itm_forward(
                self.model.fusion,
                enc.text_tokens,
                enc.text_mask,
                enc.image_tokens,
                sim_i2t,
                sim_t2i,
                same_id_mask(ids, ids),
                hard=cfg.negatives == "hard",
                uniform=cfg.easy_share,
                generator=self.sampler if images.device.type == "cpu" else None,
                negative_tokens=enc.negative_tokens,
                negative_mask=enc.negative_mask,
                negative_valid=negative_valid,
                image_global=enc.image_feat,
            )
            out.update(itm)
            loss = loss + cfg.itm_weight * itm["itm"]
        out["loss"] = loss
        return out

    @torch.no_grad()
    def after_step(self) -> None:
        clamp_logit_scale(self.model.clip.logit_scale, self.cfg.max_logit_scale)

    def components(self, refined: bool = False) -> dict[str, nn.Module]:
        """What a checkpoint saves for inference (the momentum twin and queue go in the resume state only);
        refined: the refinement stage has trained the fusion encoder."""
        parts = {"dual_encoder": self.model.clip}
        if self.cfg.itm and (self.cfg.joint_itm or refined):
            parts["fusion"] = self.model.fusion  # an untrained ITM head would only mislead re-ranking
        return parts

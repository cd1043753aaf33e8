"""CLIP-style image-text contrastive loss (InfoNCE), features gathered across ranks for the global batch.

Losses take features and return a dict; they never hold the model (STYLE rule 4, open_clip `ClipLoss`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.losses.mining import same_id_mask


def _world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is absent or not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(x: Tensor, keep_local_grad: bool) -> Tensor:
    rank, world = _world()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    if keep_local_grad:
        # all_gather returns leaves without history; putting the local tensor back lets gradients reach this
        # rank's encoder. Every rank computes the full global loss, so each local slice still receives the
        # exact gradient of that loss (open_clip: gather_with_grad=False, local_loss=False).
        parts[rank] = x
    return torch.cat(parts, dim=0)  # (world * B, ...)


def gather_features(image_features: Tensor, text_features: Tensor) -> tuple[Tensor, Tensor]:
    """All-gather (B, D) features from every rank into (world * B, D), the local slice keeping its gradient.

    Identity when torch.distributed is not initialised or the world has one rank. All ranks must pass the
    same batch size (all_gather requires equal shapes; use drop_last in the sampler).
    """
    if _world()[1] == 1:
        return image_features, text_features
    return _all_gather(image_features, True), _all_gather(text_features, True)


def gather_ids(ids: Tensor) -> Tensor:
    """All-gather (B,) ids into (world * B,) in rank order, matching `gather_features`; identity on one rank."""
    if _world()[1] == 1:
        return ids
    return _all_gather(ids, False)


def local_block(sim: Tensor) -> Tensor:
    """This rank's columns of a (B, world * B) similarity: the (B, B) in-batch block that ITM mining needs
    (the fusion encoder only holds the local batch's token states). Identity on one rank."""
    rank, world = _world()
    b = sim.shape[0]
    if sim.shape[1] != world * b:
        raise ValueError(f"expected a (B, world * B) = ({b}, {world * b}) similarity, got {tuple(sim.shape)}")
    return sim[:, rank * b : (rank + 1) * b]  # (B, B)


def soft_targets(row_ids: Tensor, col_ids: Tensor) -> Tensor:
    """(R, C) float targets spreading each row's probability evenly over the columns that share its id."""
    mask = same_id_mask(row_ids, col_ids).float()  # (R, C)
    return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)  # (R, C)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum(targets * log_softmax(logits)); float32 so bf16 logits don't lose the loss.
    Columns at -inf (masked out) must have zero target; they contribute nothing rather than 0 * inf = NaN."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(targets * logp.masked_fill(targets == 0, 0.0)).sum(dim=1).mean()


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    *,
    gather: bool = True,
    image_ids: Tensor | None = None,
    negative_text: Tensor | None = None,
    negative_valid: Tensor | None = None,
) -> dict[str, Tensor]:
    """Symmetric InfoNCE on L2-normalised features.

    image_features, text_features: (B, D), row i of each is a pair. logit_scale: scalar tensor, the exp'd
    learnable temperature. gather: contrast against the global batch across ranks. image_ids: optional (B,)
    ids; rows sharing an id (the same image, or a repeated synthetic caption) are all positives for each other,
    with the target probability spread evenly over them (ALBEF's idx targets); without ids, the diagonal.
    negative_text: optional (B, D) features of extra false captions (NegCLIP): every image is also contrasted
    against them (image-to-text only; they are nobody's positive); negative_valid (B,) bool drops some.

    Returns {"itc": loss, "sim_i2t": (B, B_global), "sim_t2i": (B, B_global)}; the sims are the detached,
    temperature-scaled logits of the local rows, ready for `mining.sample_negatives` (use `local_block` to
    keep the in-batch columns).
    """
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(
            f"image and text features must be the same (B, D); got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    image_features = F.normalize(image_features, dim=-1)  # (B, D)
    text_features = F.normalize(text_features, dim=-1)  # (B, D)
    b = image_features.shape[0]
    if negative_text is not None:
        negative_text = F.normalize(negative_text, dim=-1)  # (B, D)
        if negative_text.shape != text_features.shape:
            raise ValueError(f"negative_text must be (B, D) like the text; got {tuple(negative_text.shape)}")
        if negative_valid is None:
            negative_valid = torch.ones(b, dtype=torch.bool, device=negative_text.device)
    offset = 0
    if gather:
        rank, world = _world()
        offset = rank * b
        image_features, text_features = gather_features(image_features, text_features)  # (Bg, D)
        if image_ids is not None:
            image_ids = gather_ids(image_ids)  # (Bg,)
        if negative_text is not None and world > 1:
            negative_text = _all_gather(negative_text, True)
            negative_valid = gather_ids(negative_valid.to(torch.uint8)).bool()  # gloo gathers no bool tensors

    # The full global logit matrix on every rank: each local slice then gets the exact global gradient.
    logits_per_image = logit_scale * image_features @ text_features.T  # (Bg, Bg)
    logits_per_text = logits_per_image.T  # (Bg, Bg)
    bg = logits_per_image.shape[0]
    i2t = logits_per_image
    if negative_text is not None:
        extra = logit_scale * image_features @ negative_text.T  # (Bg, Bg), all negatives
        extra = extra.masked_fill(~negative_valid.view(1, -1), float("-inf"))
        i2t = torch.cat([logits_per_image, extra], dim=1)  # (Bg, 2 Bg)
    if image_ids is None:
        labels = torch.arange(bg, device=logits_per_image.device)  # (Bg,)
        loss_i2t = F.cross_entropy(i2t.float(), labels)
        loss_t2i = F.cross_entropy(logits_per_text.float(), labels)
    else:
        targets = soft_targets(image_ids, image_ids)  # (Bg, Bg), symmetric
        loss_i2t = soft_cross_entropy(i2t, F.pad(targets, (0, i2t.shape[1] - bg)))
        loss_t2i = soft_cross_entropy(logits_per_text, targets)
    return {
        "itc": (loss_i2t + loss_t2i) / 2,
        "sim_i2t": logits_per_image[offset : offset + b].detach(),  # (B, Bg)
        "sim_t2i": logits_per_text[offset : offset + b].detach(),  # (B, Bg)
    }


def init_logit_scale(temperature: float = 0.07) -> nn.Parameter:
    """The learnable log-scale, log(1 / temperature); CLIP starts at 0.07."""
    return nn.Parameter(torch.tensor(math.log(1.0 / temperature)))


@torch.no_grad()
def clamp_logit_scale(logit_scale_param: nn.Parameter, max_scale: float = 100.0) -> None:
    """Clamp the log-scale parameter in place to [0, log(max_scale)] after each optimiser step.

    Above ~100 the logits saturate and training destabilises (CLIP); below 1 (temperature above 1) the
    softmax is flatter than cosine similarity itself, which never helps.
    """
    logit_scale_param.clamp_(0.0, math.log(max_scale))

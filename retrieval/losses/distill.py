"""ALBEF momentum distillation: an EMA copy of the encoders, a queue of its past features, soft ITC targets.

Order of a training step (ALBEF): momentum_update -> momentum features (no grad) -> distilled_clip_loss ->
queue.enqueue(momentum features). Enqueueing after the loss keeps the current batch from appearing twice.
Under DDP, enqueue the gathered momentum features (`contrastive.gather_features` / `gather_ids`) so every
rank holds the same queue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.losses.contrastive import soft_cross_entropy, soft_targets


@torch.no_grad()
def momentum_update(model: nn.Module, momentum_model: nn.Module, momentum: float) -> None:
    """momentum_param = momentum * momentum_param + (1 - momentum) * param; buffers are copied as they are."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    params = list(model.named_parameters())
    m_params = list(momentum_model.named_parameters())
    if [n for n, _ in params] != [n for n, _ in m_params]:
        raise ValueError(
            "model and momentum_model have different parameters; build both from the same config"
        )
    for (_, p), (_, mp) in zip(params, m_params, strict=True):
        mp.mul_(momentum).add_(p.detach().to(mp.dtype), alpha=1.0 - momentum)
    buffers = list(model.named_buffers())
    m_buffers = list(momentum_model.named_buffers())
    if [n for n, _ in buffers] != [n for n, _ in m_buffers]:
        raise ValueError("model and momentum_model have different buffers; build both from the same config")
    for (_, b), (_, mb) in zip(buffers, m_buffers, strict=True):
        mb.copy_(b)


class FeatureQueue(nn.Module):
    """A ring buffer of past momentum features and their ids; buffers, so it checkpoints with state_dict."""

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        if dim < 1 or size < 1:
            raise ValueError(f"FeatureQueue needs dim >= 1 and size >= 1, got dim={dim}, size={size}")
        self.dim, self.size = dim, size
        self.register_buffer("image_queue", torch.zeros(size, dim))  # (Q, D)
        self.register_buffer("text_queue", torch.zeros(size, dim))  # (Q, D)
        # -1 marks "no id": ids are non-negative, so an id-less entry is never anyone's positive.
        self.register_buffer("idx_queue", torch.full((size,), -1, dtype=torch.long))  # (Q,)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to write
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # slots written so far, <= size

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, idx: Tensor | None = None) -> None:
        """Write (n, D) features (and (n,) ids) at the pointer, wrapping around; n may exceed the size."""
        n = image_feat.shape[0]
        if image_feat.shape != (n, self.dim) or text_feat.shape != (n, self.dim):
            raise ValueError(
                f"enqueue expects image and text features of shape (n, {self.dim}); "
                f"got {tuple(image_feat.shape)} and {tuple(text_feat.shape)}"
            )
        if idx is None:
            idx = torch.full((n,), -1, dtype=torch.long, device=image_feat.device)  # (n,)
        elif idx.shape != (n,):
            raise ValueError(f"enqueue expects idx of shape ({n},), got {tuple(idx.shape)}")
        # Of a batch larger than the queue only the newest `size` rows survive; dropping the rest up front keeps
        # slot indices unique (repeated indices in one index_put have no defined winner on CUDA).
        skip = max(n - self.size, 0)
        image_feat, text_feat, idx = image_feat[skip:], text_feat[skip:], idx[skip:]
        start = (self.ptr + skip) % self.size
        slots = (start + torch.arange(n - skip, device=self.ptr.device)) % self.size  # (n',)
        self.image_queue[slots] = image_feat.detach().to(self.image_queue)
        self.text_queue[slots] = text_feat.detach().to(self.text_queue)
        self.idx_queue[slots] = idx.to(self.idx_queue)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_((self.filled + n).clamp(max=self.size))

    def features(self) -> tuple[Tensor, Tensor, Tensor]:
        """(image (F, D), text (F, D), idx (F,)) for the F filled slots; writes start at 0, so they lead."""
        f = int(self.filled)
        return self.image_queue[:f], self.text_queue[:f], self.idx_queue[:f]


def distilled_clip_loss(
    image_feat: Tensor,
    text_feat: Tensor,
    m_image_feat: Tensor,
    m_text_feat: Tensor,
    queue: FeatureQueue,
    logit_scale: Tensor,
    alpha: float,
    image_ids: Tensor | None = None,
    negative_text: Tensor | None = None,
    m_negative_text: Tensor | None = None,
    negative_valid: Tensor | None = None,
) -> dict[str, Tensor]:
    """ALBEF ITC with momentum distillation.

    Each image is contrasted against [momentum text features of the batch; queued text features] and each text
    against the image counterpart. Targets = alpha * softmax(momentum model's sims) + (1 - alpha) * hard targets,
    where hard targets spread over every column sharing the row's id (batch ids + queued ids) when image_ids
    (non-negative, (B,)) is given, else the diagonal of the batch block. All features are L2-normalised here.
    negative_text / m_negative_text: optional (B, D) features of generated false captions (model / momentum
    model), extra image-to-text columns as in `contrastive.clip_loss`; negative_valid (B,) bool drops some.

    Returns {"itc": loss, "sim_i2t": (B, B), "sim_t2i": (B, B)}: detached, temperature-scaled in-batch sims
    (the ones ALBEF mines ITM negatives from).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    b = image_feat.shape[0]
    image_feat = F.normalize(image_feat, dim=-1)  # (B, D)
    text_feat = F.normalize(text_feat, dim=-1)  # (B, D)
    with torch.no_grad():
        q_image, q_text, q_idx = queue.features()  # (Q, D), (Q, D), (Q,)
        image_all = F.normalize(torch.cat([m_image_feat, q_image.to(m_image_feat)]), dim=-1)  # (B + Q, D)
        text_all = F.normalize(torch.cat([m_text_feat, q_text.to(m_text_feat)]), dim=-1)  # (B + Q, D)
        if image_ids is None:
            hard = torch.zeros(b, image_all.shape[0], device=image_feat.device)  # (B, B + Q)
            hard[:, :b] = torch.eye(b, device=image_feat.device)
        else:
            if (image_ids < 0).any():
                raise ValueError("image_ids must be non-negative: -1 marks id-less queue entries")
            hard = soft_targets(image_ids, torch.cat([image_ids, q_idx.to(image_ids)]))  # (B, B + Q)
        scale = logit_scale.detach()
        m_sim_i2t = scale * image_all[:b] @ text_all.T  # (B, B + Q)
        m_sim_t2i = scale * text_all[:b] @ image_all.T  # (B, B + Q)
        if negative_text is not None:
            if m_negative_text is None:
                raise ValueError("negative_text needs m_negative_text, the momentum model's features of them")
            if negative_valid is None:
                negative_valid = torch.ones(b, dtype=torch.bool, device=image_feat.device)
            masked = ~negative_valid.view(1, -1)  # (1, B)
            m_extra = scale * image_all[:b] @ F.normalize(m_negative_text, dim=-1).T  # (B, B)
            m_sim_i2t = torch.cat([m_sim_i2t, m_extra.masked_fill(masked, float("-inf"))], dim=1)
        targets_i2t = alpha * F.softmax(m_sim_i2t.float(), dim=1)  # (B, B + Q [+ B])
        targets_i2t = targets_i2t + (1 - alpha) * F.pad(hard, (0, m_sim_i2t.shape[1] - hard.shape[1]))
        targets_t2i = alpha * F.softmax(m_sim_t2i.float(), dim=1) + (1 - alpha) * hard  # (B, B + Q)

    sim_i2t = logit_scale * image_feat @ text_all.T  # (B, B + Q)
    sim_t2i = logit_scale * text_feat @ image_all.T  # (B, B + Q)
    i2t = sim_i2t
    if negative_text is not None:
        extra = logit_scale * image_feat @ F.normalize(negative_text, dim=-1).T  # (B, B)
        i2t = torch.cat([sim_i2t, extra.masked_fill(masked, float("-inf"))], dim=1)  # (B, B + Q + B)
    loss = (soft_cross_entropy(i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2
    return {
        "itc": loss,
        "sim_i2t": sim_i2t[:, :b].detach(),  # (B, B)
        "sim_t2i": sim_t2i[:, :b].detach(),  # (B, B)
    }


@torch.no_grad()
def match_belief(
    image_feat: Tensor,
    text_feat: Tensor,
    caption: Tensor,
    scale: float | Tensor,
    negatives: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The momentum model's belief that each training pair matches, as ALBEF's soft ITC targets give it.

    image_feat (N, D) and text_feat (U, D) L2-normalised momentum features; caption (N,) long, each image's row of
    text_feat (pairs that share a caption share the row). Per pair, the soft target of its own caption among it and
    `negatives` other captions drawn at random (softmax of scale * cosine), and the same for its own image among it
    and `negatives` images of other captions; the belief is the mean of the two, in (0, 1]. A true pair scores
    near 1 when the model tells it from random others; a caption written for another image scores near
    1 / (negatives + 1). Returns (N,) float.
    """
    n, u = len(image_feat), len(text_feat)
    if caption.shape != (n,) or n < 2 or u < 2 or negatives < 1:
        raise ValueError(
            f"need image_feat (N, D), caption (N,), N >= 2, U >= 2 and negatives >= 1; got {tuple(image_feat.shape)}, "
            f"{tuple(caption.shape)}, U={u}, negatives={negatives}"
        )
    # other captions: a uniform draw over the U - 1 rows that are not the pair's own
    shift = torch.randint(1, u, (n, negatives), generator=generator, device="cpu").to(caption.device)
    other_text = (caption.unsqueeze(1) + shift) % u  # (N, K)
    own = (image_feat * text_feat[caption]).sum(-1, keepdim=True)  # (N, 1)
    to_texts = _dot_rows(image_feat, text_feat, other_text)  # (N, K)
    i2t = torch.cat([own, to_texts], 1).mul(scale).softmax(-1)[:, 0]  # (N,)
    # other images: uniform draws, redrawn where they share the pair's caption (a positive, not a negative)
    other_image = torch.randint(0, n, (n, negatives), generator=generator, device="cpu").to(caption.device)
    for _ in range(8):
        same = caption[other_image] == caption.unsqueeze(1)  # (N, K)
        if not same.any():
            break
        redraw = torch.randint(0, n, (int(same.sum()),), generator=generator, device="cpu").to(caption.device)
        other_image[same] = redraw
    to_images = _dot_rows(text_feat[caption], image_feat, other_image)  # (N, K)
    to_images = to_images.masked_fill(caption[other_image] == caption.unsqueeze(1), float("-inf"))
    t2i = torch.cat([own, to_images], 1).mul(scale).softmax(-1)[:, 0]  # (N,)
    return (i2t + t2i) / 2


def _dot_rows(a: Tensor, b: Tensor, index: Tensor, chunk: int = 1024) -> Tensor:
    """(N, K): a[n] . b[index[n, k]], gathered chunk rows at a time so no (N, K, D) tensor is ever built."""
    return torch.cat(
        [
            torch.einsum("nd,nkd->nk", a[i : i + chunk], b[index[i : i + chunk]])
            for i in range(0, len(a), chunk)
        ]
    )

"""Token states of any OpenCLIP model's towers: what the fusion encoder (ITM) reads beside the pooled features.

OpenCLIP's encode_image / encode_text give pooled features only, and each tower family keeps its token states
in another place:

    vision   VisionTransformer   patch tokens after ln_post (visual.output_tokens), class token left out
             ModifiedResNet      the last stage's feature map (B, C, H, W) read as H x W tokens of width C
             TimmModel           the trunk's last feature map or patch tokens (forward_intermediates, norm on)
    text     CLIP's own tower    token states after ln_final (mirrors CLIP.encode_text)
             TextTransformer     the same, of a CustomTextCLIP / CoCa text tower (forward_intermediates)
             HFTextEncoder       the Hugging Face model's last_hidden_state

Anything else has no token states we can read: `token_widths` says why, and training refuses ITM at its start
(`check_towers`) with that reason rather than failing with an AttributeError mid-step.
"""

from __future__ import annotations

import torch
from open_clip.hf_model import ClsLastHiddenStatePooler, ClsPooler, HFTextEncoder, MeanPooler
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from torch import Tensor, nn

from retrieval.errors import UserError

PAD_ID = 0  # OpenCLIP's SimpleTokenizer pads with 0; other tokenizers name theirs (see pad_id)
_EXACT_HF_POOLERS = (MeanPooler, ClsPooler, ClsLastHiddenStatePooler)  # blind to trailing padding
_VISION = {"VisionTransformer": VisionTransformer, "ModifiedResNet": ModifiedResNet, "TimmModel": TimmModel}
_TEXT = {"TextTransformer": TextTransformer, "HFTextEncoder": HFTextEncoder}


class TowerError(ValueError):
    """A tower whose token states the fusion encoder cannot read; the message is the reason."""


def _family(clip: nn.Module) -> tuple[str, str]:
    """(vision family, text family) names, "" where the tower is of no family read here."""
    visual = getattr(clip, "visual", None)
    vision = next((name for name, cls in _VISION.items() if isinstance(visual, cls)), "")
    text = getattr(clip, "text", None)
    if text is None:  # CLIP keeps its text tower's parts on itself
        kind = "builtin" if hasattr(clip, "token_embedding") and hasattr(clip, "transformer") else ""
    else:
        kind = next((name for name, cls in _TEXT.items() if isinstance(text, cls)), "")
    return vision, kind


def token_widths(clip: nn.Module) -> tuple[int, int]:
    """(image token width, text token width); TowerError naming the tower the fusion cannot read."""
    vision, text = _family(clip)
    if not vision:
        raise TowerError(
            f"its vision tower {type(getattr(clip, 'visual', None)).__name__} has no token states"
        )
    if not text:
        tower = getattr(clip, "text", clip)
        raise TowerError(f"its text tower {type(tower).__name__} has no token states")
    visual = clip.visual
    if vision == "VisionTransformer":
        image_width = visual.transformer.width
    elif vision == "ModifiedResNet":
        image_width = visual.attnpool.k_proj.in_features  # channels of the last stage
    else:
        if not hasattr(visual.trunk, "forward_intermediates"):
            name = type(visual.trunk).__name__
            raise TowerError(f"its timm trunk {name} has no forward_intermediates (timm >= 1.0 models do)")
        info = getattr(visual.trunk, "feature_info", None)
        # the last stage's channels: an EfficientNet's head conv (num_features) comes after it
        image_width = info[-1]["num_chs"] if info else visual.trunk.num_features
    if text == "builtin":
        text_width = clip.transformer.width
    elif text == "TextTransformer":
        text_width = clip.text.width
    else:
        text_width = clip.text.transformer.get_input_embeddings().embedding_dim
    return int(image_width), int(text_width)


def embed_dim(clip: nn.Module) -> int:
    """Width of the shared image-text space (of the pooled, projected features)."""
    text = getattr(clip, "text", None)
    if text is not None and getattr(text, "output_dim", None):  # TextTransformer, HFTextEncoder
        return int(text.output_dim)
    projection = clip.text_projection
    if projection is None:  # no projection: the shared space is the text tower's own width
        return int(clip.transformer.width)
    return int(projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1])


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def pad_id(clip: nn.Module) -> int:
    """The id the model's tokenizer pads with: real tokens are the others."""
    text = getattr(clip, "text", None)
    if isinstance(text, HFTextEncoder):
        return int(text.config.pad_token_id if text.config.pad_token_id is not None else 0)
    return int(getattr(text, "pad_id", PAD_ID))


def text_mask(clip: nn.Module, text: Tensor) -> Tensor:
    """(B, L) ids -> (B, L) bool, True for real tokens."""
    return text != pad_id(clip)


def encode_image_tokens(clip: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """images (B, 3, S, S) normalised -> (pooled projected (B, D), tokens (B, N, Wv))."""
    vision, _ = _family(clip)
    visual = clip.visual
    if vision == "VisionTransformer":
        previous, visual.output_tokens = visual.output_tokens, True  # CoCa's tower has it on already
        try:
            pooled, tokens = visual(images)  # (B, D), (B, N, Wv)
        finally:
            visual.output_tokens = previous
        return pooled, tokens
    if not vision:
        token_widths(clip)  # raises the reason
    out = visual.forward_intermediates(images, indices=1, normalize_intermediates=True, output_fmt="NCHW")
    fmap = out["image_intermediates"][-1]  # (B, C, H, W), or (B, N, C) for a token trunk
    tokens = fmap.flatten(2).transpose(1, 2) if fmap.dim() == 4 else fmap  # (B, N, Wv)
    return out["image_features"], tokens


def trimmed_length(clip: nn.Module, text: Tensor) -> int:
    """How many leading positions of `text` (B, L) the text tower must run to give exactly its full-length
    outputs: up to the longest text in the batch when padding can't reach a real token (a causal tower that
    pools a token inside the text, or a Hugging Face tower under its attention mask), else all L."""
    _, family = _family(clip)
    if family == "builtin":
        exact = clip.attn_mask is not None and clip.text_pool_type in ("argmax", "eos", "first")
    elif family == "HFTextEncoder":
        exact = isinstance(clip.text.pooler, _EXACT_HF_POOLERS)
    else:  # TextTransformer slices no mask to a shorter text
        exact = False
    if not exact:
        return text.shape[1]
    real = text_mask(clip, text).any(dim=0).nonzero()  # columns holding a real token in some row
    return int(real.max()) + 1 if len(real) else 1


def encode_text_tokens(clip: nn.Module, text: Tensor, trim: bool = False) -> tuple[Tensor, Tensor]:
    """text (B, L) ids -> (pooled projected (B, D), token states (B, L', Wt)).

    trim=True drops the trailing columns that are padding in every row where that changes nothing (see
    trimmed_length; L' <= L): synth captions fill half of a 32-token context, so training runs the text tower and
    the fusion encoder on half the tokens. The caller slices its mask with `text[:, :L']`.
    """
    _, family = _family(clip)
    length = trimmed_length(clip, text) if trim else text.shape[1]
    text = text[:, :length]  # (B, L')
    if family == "builtin":
        return _builtin_text(clip, text)
    if family == "TextTransformer":
        out = clip.text.forward_intermediates(text, indices=1, normalize_intermediates=True, output_fmt="NLC")
        return out["text_features"], out["text_intermediates"][-1]  # (B, D), (B, L, Wt)
    if family == "HFTextEncoder":
        tower = clip.text
        mask = text_mask(clip, text).long()  # (B, L')
        out = tower.transformer(input_ids=text, attention_mask=mask)
        return tower.proj(tower.pooler(out, mask)), out.last_hidden_state  # (B, D), (B, L', Wt)
    token_widths(clip)  # raises the reason
    raise AssertionError("unreachable")


def _builtin_text(clip: nn.Module, text: Tensor) -> tuple[Tensor, Tensor]:
    """CLIP.encode_text, keeping the token states."""
    length = text.shape[1]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(text).to(cast_dtype)  # (B, L, Wt)
    x = x + clip.positional_embedding[:length].to(cast_dtype)
    mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
    x = clip.transformer(x, attn_mask=mask)
    tokens = clip.ln_final(x)  # (B, L, Wt)
    pooled = text_global_pool(
        tokens, text, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None)
    )
    if isinstance(clip.text_projection, nn.Linear):
        pooled = clip.text_projection(pooled)
    elif clip.text_projection is not None:
        pooled = pooled @ clip.text_projection  # (B, D)
    return pooled, tokens


def check_towers(clip: nn.Module, arch: str, itm: bool) -> None:
    """At the start of training: UserError, one line, if the model cannot train what was asked. ITC needs only
    the pooled features every OpenCLIP model gives; ITM needs token states of both towers, which a forward pass of
    one image and one text checks against the widths the fusion encoder is built for."""
    if not itm:
        return
    fix = "train ITC alone with --set objectives.itm=false"
    try:
        widths = token_widths(clip)
        size = clip.visual.image_size
        side = int(size[0] if isinstance(size, (tuple, list)) else size)
        device = _device(clip)
        was_training = clip.training
        clip.eval()
        try:
            with torch.no_grad():
                _, image = encode_image_tokens(
                    clip, torch.zeros(1, 3, side, side, device=device)
                )  # (1, N, Wv)
                ids = torch.full((1, 4), pad_id(clip) + 1, dtype=torch.long, device=device)
                _, text = encode_text_tokens(clip, ids)  # (1, 4, Wt)
        finally:
            clip.train(was_training)
        got = (image.shape[-1] if image.dim() == 3 else None, text.shape[-1] if text.dim() == 3 else None)
        if got != widths:
            raise TowerError(f"its token states have widths {got}, not the {widths} its towers declare")
    except TowerError as e:
        raise UserError(f"model {arch}: ITM cannot read token states ({e}); {fix}") from e
    except (AttributeError, NotImplementedError, RuntimeError, TypeError) as e:
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"model {arch}: ITM cannot read token states ({reason}); {fix}") from e

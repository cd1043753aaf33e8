"""The captioner: an image-grounded text decoder (BLIP's LM branch). Causal self-attention over the caption so
far, cross-attention to the image's patch tokens (models/towers.py, any OpenCLIP vision tower), an LM head.

Its vocabulary is word-level and cut to the words of the training captions (a few hundred on synth scenes, so the
head is small and fast on a CPU); it is saved in the checkpoint. A word never seen maps to UNK, so any caption
still tokenises and scores. The decoder keeps per-layer key/value caches for generation (models/generate.py).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.models.fusion import grid_positions

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_WORD = re.compile(r"[\w']+|[^\w\s]")


@dataclass(frozen=True)
class CaptionerConfig:
    width: int = 192  # decoder width: synth captions need little, photos want 512+
    layers: int = 3  # decoder blocks, each causal self-attn + cross-attn + MLP
    heads: int = 4  # attention heads per block
    max_len: int = 24  # tokens incl. BOS/EOS: the longest synth caption is 15 words
    max_vocab: int = 20000  # most frequent training words kept; the rest map to UNK
    dropout: float = 0.1  # in attention outputs and MLPs
    word_dropout: float = 0.3  # share of input (teacher-forced) words replaced by UNK in training: the next
    # word must come from the image, not from the words before it (unseen colour/shape combinations)
    label_smoothing: float = 0.1  # softer targets: a less peaked LM prior over seen combinations
    mirror: str = "auto"  # auto | on | off: mirror training images, swapping left/right (and above/below) in
    # their captions (train/twins.py); auto: when refine.relation_terms' rule finds relation captions
    mirror_prob: float = 0.5  # share of training rows mirrored when on
    # share of training rows recoloured when the run's `recolour` is on: all, so no colour predicts a shape and
    # the decoder's language prior cannot write a seen combination for an unseen one (docs/capfilt.md)
    recolour_prob: float = 1.0
    freeze_image: bool = (
        True  # keep the image tower (e.g. an ITC-trained one) as it is: only the decoder trains
    )
    image_positions: bool = True  # add fixed 2D sin-cos positions to the image tokens (square grids), as the
    # fusion encoder does: where a thing is becomes one cross-attention lookup, for the words of a relation
    image_width: int = 0  # width of the image tokens; set from the vision tower when built


def words(text: str) -> list[str]:
    """Lowercased words and punctuation marks: the units of the vocabulary."""
    return _WORD.findall(text.lower())


class Vocab:
    """Word <-> id, specials first. Unknown words -> UNK, so every caption tokenises."""

    def __init__(self, itos: Sequence[str]):
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, captions: Iterable[str], max_size: int = 20000) -> Vocab:
        """The training captions' words, most frequent first (ties alphabetical: the same data, the same ids)."""
        counts = Counter(w for c in captions for w in words(c))
        ranked = sorted(counts, key=lambda w: (-counts[w], w))[: max(0, max_size - len(SPECIALS))]
        return cls([*SPECIALS, *ranked])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_len: int) -> list[int]:
        """BOS words EOS, truncated to max_len (the EOS kept)."""
        ids = [self.stoi.get(w, UNK) for w in words(text)][: max_len - 2]
        return [BOS, *ids, EOS]

    def __call__(self, texts: Sequence[str] | str, max_len: int = 24) -> Tensor:
        """(N, max_len) long, PAD-padded: the shape TrainData's tokenizer gives."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.full((len(texts), max_len), PAD, dtype=torch.long)  # (N, L)
        for i, t in enumerate(texts):
            ids = self.encode(t, max_len)
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        for i in ids:
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            w = self.itos[i] if 0 <= i < len(self.itos) else SPECIALS[UNK]
            if out and re.fullmatch(r"[^\w\s]", w) and w not in "(\"'":
                out[-1] += w  # punctuation sticks to the word before it
            else:
                out.append(w)
        return " ".join(out)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, kv_width: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(kv_width, 2 * width)
        self.out = nn.Linear(width, width)

    def split(self, x: Tensor) -> Tensor:
        b, t, w = x.shape
        return x.view(b, t, self.heads, w // self.heads).transpose(1, 2)  # (B, nh, T, hs)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.kv(x).chunk(2, dim=-1)  # (B, T, W) each
        return self.split(k), self.split(v)  # (B, nh, T, hs)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Tensor | None = None) -> Tensor:
        q = self.split(self.q(x))  # (B, nh, Tq, hs)
        p = self.dropout if self.training else 0.0
        # causal with a cache: the Tq new queries sit at the end of the Tk keys
        if causal and q.shape[2] > 1:
            tq, tk = q.shape[2], k.shape[2]
            mask = torch.ones(tq, tk, dtype=torch.bool, device=x.device).tril(tk - tq)  # (Tq, Tk)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, Tq, hs)
        b, _, t, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, t, -1))  # (B, Tq, W)


class _Block(nn.Module):
    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        w = cfg.width
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(w), nn.LayerNorm(w), nn.LayerNorm(w)
        self.self_attn = _Attention(w, cfg.heads, w, cfg.dropout)
        self.cross_attn = _Attention(w, cfg.heads, w, cfg.dropout)
        self.mlp = nn.Sequential(nn.Linear(w, 4 * w), nn.GELU(), nn.Linear(4 * w, w), nn.Dropout(cfg.dropout))

    def forward(self, x: Tensor, memory_kv: tuple[Tensor, Tensor], cache: list | None) -> Tensor:
        h = self.ln1(x)
        k, v = self.self_attn.keys_values(h)  # (B, nh, T, hs)
        if cache is not None:
            if cache[0] is not None:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[0], cache[1] = k, v
        x = x + self.self_attn(h, k, v, causal=True)
        x = x + self.cross_attn(self.ln2(x), *memory_kv, causal=False)
        return x + self.mlp(self.ln3(x))


class CaptionDecoder(nn.Module):
    """Token ids + image tokens -> next-token logits. Holds no image tower: the caller encodes the image."""

    def __init__(self, cfg: CaptionerConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.zeros(cfg.max_len, cfg.width))
        self.image_proj = nn.Sequential(nn.Linear(cfg.image_width, cfg.width), nn.LayerNorm(cfg.width))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        # the LM head is the embedding transposed (tied): fewer parameters to learn from a small clean set
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.embed.weight, std=1 / math.sqrt(cfg.width))

    def memory(self, image_tokens: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per-block cross-attention keys/values of the image, computed once per image (B, N, Wv)."""
        m = self.image_proj(image_tokens)  # (B, N, W)
        if self.cfg.image_positions:
            m = m + grid_positions(m.shape[1], m.shape[2], m.device, m.dtype)
        return [blk.cross_attn.keys_values(m) for blk in self.blocks]  # (B, nh, N, hs) pairs

    def forward(
        self, tokens: Tensor, memory: list[tuple[Tensor, Tensor]], caches: list | None = None, start: int = 0
    ) -> Tensor:
        """tokens (B, T) at positions start..start+T-1; caches: one [k, v] per block, extended in place."""
        x = self.embed(tokens) + self.pos[start : start + tokens.shape[1]]  # (B, T, W)
        for i, blk in enumerate(self.blocks):
            x = blk(x, memory[i], caches[i] if caches is not None else None)
        return F.linear(self.ln_f(x), self.embed.weight)  # (B, T, V)

    def new_caches(self) -> list[list]:
        return [[None, None] for _ in self.blocks]


def reorder_caches(caches: list[list], index: Tensor) -> None:
    """Keep rows `index` of every cache (beam search follows its surviving beams)."""
    for c in caches:
        if c[0] is not None:
            c[0], c[1] = c[0].index_select(0, index), c[1].index_select(0, index)


class Captioner(nn.Module):
    """An OpenCLIP model's vision tower (its patch tokens) + a CaptionDecoder. In a checkpoint the tower is the
    `dual_encoder` component and the decoder the `captioner` one, with config.json's "captioner" entry holding
    the decoder's config and its vocabulary."""

    def __init__(self, clip: nn.Module, cfg: CaptionerConfig, vocab: Vocab):
        super().__init__()
        from retrieval.models.towers import token_widths

        image_width, _ = token_widths(clip)
        self.clip, self.vocab = clip, vocab
        self.cfg = CaptionerConfig(**{**cfg.__dict__, "image_width": image_width})
        self.decoder = CaptionDecoder(self.cfg, len(vocab))

    def image_tokens(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) normalised -> (B, N, Wv) patch tokens."""
        from retrieval.models.towers import encode_image_tokens

        if self.cfg.freeze_image:
            with torch.no_grad():
                return encode_image_tokens(self.clip, images)[1]
        return encode_image_tokens(self.clip, images)[1]

    def tokenize(self, texts: Sequence[str] | str) -> Tensor:
        return self.vocab(texts, self.cfg.max_len)  # (N, L)

    def config_entry(self) -> dict:
        """What config.json records under "captioner": enough to rebuild the decoder and its vocabulary."""
        return {"config": dict(self.cfg.__dict__), "vocab": self.vocab.itos}


def load_captioner(directory) -> tuple[Captioner, str, dict]:
    """A captioner checkpoint -> (Captioner on the CPU in eval mode, architecture, its config.json)."""
    from retrieval.config import from_dict
    from retrieval.errors import UserError
    from retrieval.models.checkpoint import load_component, load_dual_encoder, read_config

    config = read_config(directory)
    entry = config.get("captioner")
    if "captioner" not in config.get("components", {}) or not entry:
        have = ", ".join(sorted(config.get("components", {})))
        raise UserError(
            f"{directory}: not a captioner checkpoint (it has: {have}); train one with "
            "`retrieval train PAIRS --out DIR --task caption`"
        )
    clip, arch, _ = load_dual_encoder(directory)
    # a checkpoint written before image_positions existed was trained without them
    config = {"image_positions": False, **entry["config"]}
    model = Captioner(clip, from_dict(CaptionerConfig, config, "captioner"), Vocab(entry["vocab"]))
    load_component(directory, "captioner", model.decoder)
    return model.eval(), arch, config

"""A CLIP text tower in numpy: a text query's vector without importing torch or open_clip, which is most of a
cold `retrieval search` (docs/everyday.md, Cold start).

export() writes a loaded model's text side (token and position embeddings, the causal transformer, the final
norm and projection) as float32 arrays to a cache keyed by the model's identity (architecture + weights digest),
with the settings the forward pass needs, only for the towers this module computes exactly as open_clip does:
OpenCLIP's `CLIP` text transformer (causal mask, end-of-text pooling, GELU or QuickGELU, optional layer scale)
with its default BPE tokenizer (clip_bpe.py, checked on sample texts first). Anything else is not exported and
search keeps the torch path. load() finds a cached tower for a collection's model; TextTower.encode() gives the
normalised text vectors (agreement with the torch path to ~1e-6, tested).

    ~/.cache/retrieval/text-towers/<key>/tower.json           settings + the identity it came from
    ~/.cache/retrieval/text-towers/<key>/tower.safetensors    the arrays
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.config import cache_dir

FORMAT = 1
_SAMPLES = ["a red circle", "Dog + beach - night!", "naïve café 東京 can't &amp; won't", "x" * 200, ""]
_erf = np.frompyfunc(math.erf, 1, 1)


def _root() -> Path:
    return cache_dir() / "text-towers"


def cache_key(identity: dict[str, Any]) -> str | None:
    """Only for weights that name their bytes (a file or checkpoint digest, a published tag, a seeded init)."""
    arch, weights = identity.get("arch"), identity.get("weights")
    if not arch or not weights:
        return None
    return hashlib.blake2b(json.dumps([FORMAT, arch, weights]).encode(), digest_size=16).hexdigest()


class TextTower:
    def __init__(self, settings: dict[str, Any], arrays: dict[str, np.ndarray]):
        from retrieval.models.clip_bpe import ClipBPE

        self.s, self.a = settings, arrays
        self.tokenizer = ClipBPE(context_length=int(settings["context_length"]))
        if self.tokenizer.vocab_size != settings["vocab_size"]:
            raise ValueError("tokenizer vocabulary differs from the exported one")

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + self.s["eps"]) * self.a[f"{name}.weight"] + self.a[f"{name}.bias"]

    def _act(self, x: np.ndarray) -> np.ndarray:
        if self.s["act"] == "quick_gelu":
            return x / (1.0 + np.exp(-1.702 * x))
        return (0.5 * x * (1.0 + _erf(x.astype(np.float64) / math.sqrt(2.0)).astype(np.float64))).astype(
            np.float32
        )

    def encode(self, texts: list[str]) -> np.ndarray:
        """(B, D) float32, L2-normalised, as the torch encoder's encode_texts."""
        a, heads = self.a, int(self.s["heads"])
        tokens = self.tokenizer(texts)  # (B, C)
        ends = tokens.argmax(-1)  # the end-of-text token has the largest id: CLIP pools there
        n = int(ends.max()) + 1  # causal attention: the positions after the last end change nothing before it
        x = a["token_embedding"][tokens[:, :n]] + a["positional_embedding"][:n]  # (B, n, W)
        b, _, width = x.shape
        d = width // heads
        mask = np.triu(np.full((n, n), -np.inf, np.float32), 1)
        for i in range(int(self.s["layers"])):
            p = f"blocks.{i}."
            h = self._norm(x, p + "ln_1")
            qkv = h @ a[p + "in_proj_weight"].T + a[p + "in_proj_bias"]  # (B, n, 3W)
            q, k, v = (t.reshape(b, n, heads, d).transpose(0, 2, 1, 3) for t in np.split(qkv, 3, axis=-1))
            scores = (q * d**-0.5) @ k.transpose(0, 1, 3, 2) + mask  # (B, H, n, n)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            att = (scores / scores.sum(-1, keepdims=True)) @ v  # (B, H, n, d)
            att = att.transpose(0, 2, 1, 3).reshape(b, n, width) @ a[p + "out_proj_weight"].T
            x = x + (att + a[p + "out_proj_bias"]) * a.get(p + "ls_1", 1.0)
            h = self._act(self._norm(x, p + "ln_2") @ a[p + "c_fc_weight"].T + a[p + "c_fc_bias"])
            x = x + (h @ a[p + "c_proj_weight"].T + a[p + "c_proj_bias"]) * a.get(p + "ls_2", 1.0)
        x = self._norm(x, "ln_final")[np.arange(b), ends]  # (B, W)
        x = x @ a["text_projection"] + a.get("text_projection_bias", 0.0)  # (B, D)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def load(identity: dict[str, Any]) -> TextTower | None:
    """The cached numpy tower of the model with this identity, or None (then search loads the model)."""
    key = cache_key(identity)
    folder = _root() / key if key else None
    if folder is None or not (folder / "tower.json").is_file():
        return None
    try:
        from safetensors.numpy import load_file

        settings = json.loads((folder / "tower.json").read_text())
        if settings.get("format") != FORMAT or settings.get("weights") != identity.get("weights"):
            return None
        return TextTower(settings, load_file(str(folder / "tower.safetensors")))
    except Exception:  # noqa: BLE001 - a damaged or foreign cache entry (any reader error): torch answers
        return None


def _tower_arrays(model, tokenizer) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """(settings, arrays) of an OpenCLIP CLIP text tower this module computes exactly; None for any other."""
    import open_clip
    import torch
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock

    if type(model).__name__ != "CLIP" or getattr(model, "text_pool_type", None) != "argmax":
        return None
    if not isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer) or tokenizer.reduction_fn is not None:
        return None
    if tokenizer.clean_fn is not open_clip.tokenizer._clean_lower or len(tokenizer.all_special_ids) != 2:
        return None
    blocks = list(model.transformer.resblocks)
    if not blocks or any(type(b) is not ResidualAttentionBlock or hasattr(b, "ln_1_kv") for b in blocks):
        return None
    acts = {type(b.mlp.gelu) for b in blocks}
    if acts == {QuickGELU}:
        act = "quick_gelu"
    elif acts == {torch.nn.GELU} and all(b.mlp.gelu.approximate == "none" for b in blocks):
        act = "gelu"
    else:
        return None
    norms = [model.ln_final] + [n for b in blocks for n in (b.ln_1, b.ln_2)]
    if len({n.eps for n in norms}) != 1 or any(n.weight is None for n in norms):
        return None
    mask = getattr(model, "attn_mask", None)
    if mask is None or not torch.equal(mask, torch.full_like(mask, float("-inf")).triu_(1)):
        return None  # CLIP's causal mask, exactly: what lets encode() stop at the last end-of-text token

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy().copy()

    arrays = {
        "token_embedding": arr(model.token_embedding.weight),
        "positional_embedding": arr(model.positional_embedding),
        "ln_final.weight": arr(model.ln_final.weight),
        "ln_final.bias": arr(model.ln_final.bias),
    }
    proj = model.text_projection
    if isinstance(proj, torch.nn.Linear):
        arrays["text_projection"] = arr(proj.weight.T)
        if proj.bias is not None:
            arrays["text_projection_bias"] = arr(proj.bias)
    elif isinstance(proj, torch.Tensor):
        arrays["text_projection"] = arr(proj)
    else:
        return None
    for i, blk in enumerate(blocks):
        p = f"blocks.{i}."
        arrays.update(
            {
                p + "ln_1.weight": arr(blk.ln_1.weight),
                p + "ln_1.bias": arr(blk.ln_1.bias),
                p + "ln_2.weight": arr(blk.ln_2.weight),
                p + "ln_2.bias": arr(blk.ln_2.bias),
                p + "in_proj_weight": arr(blk.attn.in_proj_weight),
                p + "in_proj_bias": arr(blk.attn.in_proj_bias),
                p + "out_proj_weight": arr(blk.attn.out_proj.weight),
                p + "out_proj_bias": arr(blk.attn.out_proj.bias),
                p + "c_fc_weight": arr(blk.mlp.c_fc.weight),
                p + "c_fc_bias": arr(blk.mlp.c_fc.bias),
                p + "c_proj_weight": arr(blk.mlp.c_proj.weight),
                p + "c_proj_bias": arr(blk.mlp.c_proj.bias),
            }
        )
        for name in ("ls_1", "ls_2"):
            ls = getattr(blk, name)
            if not isinstance(ls, torch.nn.Identity):
                arrays[p + name] = arr(ls.gamma)
    settings = {
        "format": FORMAT,
        "layers": len(blocks),
        "heads": blocks[0].attn.num_heads,
        "eps": float(norms[0].eps),
        "act": act,
        "context_length": int(tokenizer.context_length),
        "vocab_size": int(tokenizer.vocab_size),
    }
    return settings, arrays


def export(encoder) -> bool:
    """Cache `encoder`'s text tower for torch-free text queries, once per model; True when one is cached (now or
    before). A tower this module cannot compute exactly, or whose tokenizer clip_bpe does not reproduce on the
    sample texts, is not cached. Failing to write the cache only leaves search on the torch path."""
    key = cache_key(encoder.identity)
    if key is None:
        return False
    folder = _root() / key
    if (folder / "tower.json").is_file():
        return True
    got = _tower_arrays(encoder.model, encoder.tokenizer)
    if got is None:
        return False
    settings, arrays = got
    settings["arch"], settings["weights"] = encoder.identity["arch"], encoder.identity["weights"]
    tower = TextTower(settings, arrays)
    if not np.array_equal(tower.tokenizer(_SAMPLES), encoder.tokenizer(_SAMPLES).numpy()):
        return False
    reference = encoder.encode_texts(_SAMPLES).numpy()
    if not np.allclose(tower.encode(_SAMPLES), reference, atol=1e-4):
        return False
    from safetensors.numpy import save_file

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}."))
        save_file(arrays, str(tmp / "tower.safetensors"))
        (tmp / "tower.json").write_text(json.dumps(settings))
        os.replace(tmp, folder)  # atomic: a reader sees no tower or a whole one
    except OSError:  # no writable cache (or another process won the rename): search keeps working
        if "tmp" in locals():
            shutil.rmtree(tmp, ignore_errors=True)
        return (folder / "tower.json").is_file()
    return True


def export_quietly(encoder) -> bool:
    """export() for the commands that offer the cache in passing (index, search): a failure is logged, never
    raised; their own work is done either way."""
    try:
        return export(encoder)
    except Exception as e:  # noqa: BLE001 - the cache is an optimisation only
        logging.getLogger(__name__).debug("text tower not cached: %s", e)
        return False

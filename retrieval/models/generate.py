"""Caption generation, batched, with a key/value cache: greedy, beam search and nucleus sampling (top-p,
temperature, repetition penalty), a minimum and maximum length, a seed.

With the cache each step runs the decoder on the newest token only (the image's cross-attention keys/values are
computed once); `use_cache=False` reruns the whole prefix and exists to check the cache against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from retrieval.models.captioner import BOS, EOS, PAD, UNK, CaptionDecoder, reorder_caches


@dataclass(frozen=True)
class GenerateConfig:
    beams: int = 1  # 1: greedy (or sampling with top_p); more: beam search
    top_p: float = 0.0  # nucleus sampling when > 0 (BLIP samples with 0.9 for diverse synthetic captions)
    temperature: float = 1.0  # sampling temperature: below 1 sharper, above 1 more diverse
    repetition_penalty: float = 1.0  # > 1 discourages tokens already written (CTRL's rule)
    min_len: int = 1  # words before EOS is allowed
    max_len: int = 20  # words at most (the decoder's max_len also bounds it)
    length_penalty: float = 1.0  # beam scores are log-prob / length^this: 0 favours short captions
    seed: int = 0  # sampling draws come from a generator seeded with this: same seed, same captions
    use_cache: bool = True  # keep keys/values of earlier steps; False recomputes the prefix every step


_BANNED = (PAD, BOS, UNK)  # never generated: a caption never says "<unk>"


def _mask(logits: Tensor, step: int, cfg: GenerateConfig, last: bool) -> Tensor:
    """Ban specials, EOS before min_len, everything but EOS at the last allowed step. logits (R, V) float."""
    logits[:, list(_BANNED)] = float("-inf")
    if step < cfg.min_len and not last:
        logits[:, EOS] = float("-inf")
    if last:
        keep = logits[:, EOS].clone()
        logits.fill_(float("-inf"))
        logits[:, EOS] = keep.clamp(min=-1e4)  # EOS must stay reachable
    return logits


def _penalise(logits: Tensor, tokens: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty on tokens already in each row (B, T); logits (B, V)."""
    if penalty == 1.0:
        return logits
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, tokens, True)  # (B, V)
    seen[:, list(_BANNED) + [EOS]] = False
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def _nucleus(logits: Tensor, top_p: float, generator: torch.Generator) -> Tensor:
    """(B,) one token per row from the smallest set of tokens holding top_p of the probability."""
    probs = logits.softmax(-1)  # (B, V)
    sorted_p, order = probs.sort(-1, descending=True)  # (B, V)
    outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # (B, V): mass before this token already reached top_p
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    pick = torch.multinomial(sorted_p, 1, generator=generator)  # (B, 1)
    return order.gather(1, pick).squeeze(1)  # (B,)


def _step_logits(decoder, tokens: Tensor, memory, caches, step: int) -> Tensor:
    if caches is not None:
        return decoder(tokens[:, -1:], memory, caches, start=step)[:, -1].float()  # (R, V)
    return decoder(tokens, memory)[:, -1].float()  # (R, V)


def _steps(decoder: CaptionDecoder, cfg: GenerateConfig) -> int:
    return max(1, min(cfg.max_len, decoder.cfg.max_len - 2) + 1)  # words + the EOS


@torch.inference_mode()
def generate_ids(decoder: CaptionDecoder, image_tokens: Tensor, cfg: GenerateConfig) -> list[list[int]]:
    """image_tokens (B, N, Wv) -> B token id lists (no BOS/EOS)."""
    if cfg.beams > 1:
        return _beam(decoder, image_tokens, cfg)
    b, device = image_tokens.shape[0], image_tokens.device
    memory = decoder.memory(image_tokens)
    caches = decoder.new_caches() if cfg.use_cache else None
    tokens = torch.full((b, 1), BOS, dtype=torch.long, device=device)  # (B, 1)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    steps = _steps(decoder, cfg)
    for t in range(steps):
        logits = _mask(_step_logits(decoder, tokens, memory, caches, t), t, cfg, t == steps - 1)
        logits = _penalise(logits, tokens, cfg.repetition_penalty)
        if cfg.top_p > 0:
            nxt = _nucleus(logits / max(cfg.temperature, 1e-5), cfg.top_p, g)  # (B,)
        else:
            nxt = logits.argmax(-1)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], 1)  # (B, t+2)
        done |= nxt == EOS
        if bool(done.all()):
            break
    return [_strip(row) for row in tokens[:, 1:].tolist()]


def _strip(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS)] if EOS in ids else [i for i in ids if i != PAD]


def _beam(decoder: CaptionDecoder, image_tokens: Tensor, cfg: GenerateConfig) -> list[list[int]]:
    """Beam search: k live beams per image; a beam that writes EOS is finished; an image is done with k
    finished beams; the best finished one by log-prob / length^length_penalty wins."""
    b, k, device = image_tokens.shape[0], cfg.beams, image_tokens.device
    memory = [
        (kk.repeat_interleave(k, 0), vv.repeat_interleave(k, 0)) for kk, vv in decoder.memory(image_tokens)
    ]
    caches = decoder.new_caches() if cfg.use_cache else None
    tokens = torch.full((b * k, 1), BOS, dtype=torch.long, device=device)  # (B*K, 1)
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # the first step expands one beam, not k copies of it
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    steps = _steps(decoder, cfg)
    for t in range(steps):
        logits = _mask(_step_logits(decoder, tokens, memory, caches, t), t, cfg, t == steps - 1)
        logp = _penalise(logits, tokens, cfg.repetition_penalty).log_softmax(-1)  # (B*K, V)
        v = logp.shape[1]
        cand = (scores.reshape(-1, 1) + logp).reshape(b, k * v)  # (B, K*V)
        top, idx = cand.topk(2 * k, dim=1)  # (B, 2K)
        src = torch.arange(b * k, device=device).reshape(b, k).clone()  # (B, K) rows the live beams come from
        new_tok = torch.full((b, k), PAD, dtype=torch.long, device=device)
        new_scores = torch.full((b, k), float("-inf"), device=device)
        for i in range(b):
            if len(finished[i]) >= k:
                continue
            live = 0
            for rank, (s, j) in enumerate(zip(top[i].tolist(), idx[i].tolist(), strict=True)):
                if s == float("-inf"):
                    break
                beam, tok = divmod(j, v)
                if tok == EOS:
                    if rank >= k:  # an ending outside the k best candidates is not kept (beam 1 = greedy)
                        continue
                    seq = tokens[i * k + beam, 1:].tolist()
                    finished[i].append((s / max(1, len(seq) + 1) ** cfg.length_penalty, seq))
                    if len(finished[i]) >= k:
                        break
                elif live < k:
                    src[i, live], new_tok[i, live], new_scores[i, live] = i * k + beam, tok, s
                    live += 1
                if live == k and rank >= k - 1:
                    break
        rows = src.reshape(-1)
        tokens = torch.cat([tokens[rows], new_tok.reshape(-1, 1)], 1)  # (B*K, t+2)
        if caches is not None:
            reorder_caches(caches, rows)
        scores = new_scores
        if all(len(f) >= k for f in finished) or bool(torch.isinf(scores).all()):
            break
    return [max(f, key=lambda x: x[0])[1] if f else [] for f in finished]

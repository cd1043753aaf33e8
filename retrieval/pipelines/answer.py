"""Answering questions about images with a VLM: one streamed answer, or many in left-padded batches with a KV
cache, greedy or sampled."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from retrieval.data.images import ImageDecodeError, load_for_model
from retrieval.errors import UserError
from retrieval.models.encoders import normalize


@dataclass(frozen=True)
class AnswerConfig:
    max_new_tokens: int = 24  # answers here are a word or a sentence
    temperature: float = 0.0  # 0: greedy; above 0: sampled at this temperature
    top_k: int = 0  # sampled: only among the k likeliest tokens (0: all)
    batch_size: int = 32  # questions per batch in answer_batch
    seed: int = 0  # sampling generator


def load_image(vlm, path: str) -> torch.Tensor:
    """Normalised (3, S, S) pixels; UserError (one line) when the file is not a readable image."""
    try:
        arr, _, _ = load_for_model(path, vlm.image["size"])
    except FileNotFoundError:
        raise UserError(f"{path}: no such image") from None
    except (ImageDecodeError, OSError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]  # (1, 3, S, S) uint8
    return normalize(x, vlm.image["mean"], vlm.image["std"], torch.device("cpu"))[0]


def _cache_kw(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _past(out):
    return out["cache"] if "cache" in out else out.past_key_values  # renamed in transformers 5


def _pick(logits: torch.Tensor, cfg: AnswerConfig, gen: torch.Generator) -> torch.Tensor:
    """(B, V) -> (B,) next token ids."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]


@torch.inference_mode()
def generate(vlm, pixels: torch.Tensor, questions: list[str], cfg: AnswerConfig) -> Iterator[torch.Tensor]:
    """pixels (B, 3, S, S) normalised; yields the (B,) token ids of each new position (KV cache, left padding);
    stops when every row has produced the end-of-sequence token."""
    for q in questions:
        if not q.strip():
            raise UserError("the question is empty")
    feats = vlm.features(pixels)
    ids = [vlm.encode(q)[0] for q in questions]
    s = vlm.splice_batch(feats, ids, pad_left=True)
    model, kw = vlm.llm, _cache_kw(vlm.llm)
    out = model(
        inputs_embeds=s.embeds,
        attention_mask=s.attention_mask,
        position_ids=s.position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    past = _past(out)
    if vlm.xstate is not None:
        vlm.xstate.mask = None  # every generated position comes after the image
    mask, pos = s.attention_mask, s.position_ids[:, -1:]
    eos = vlm.tokenizer.eos_token_id
    done = torch.zeros(len(questions), dtype=torch.bool)
    gen = torch.Generator().manual_seed(cfg.seed)
    try:
        for _ in range(cfg.max_new_tokens):
            token = _pick(out.logits[:, -1], cfg, gen)  # (B,)
            token = torch.where(done, torch.full_like(token, eos), token)
            yield token
            done |= token == eos
            if bool(done.all()):
                return
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos + 1
            out = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **{kw: past},
            )
            past = _past(out)
    finally:
        if vlm.xstate is not None:
            vlm.xstate.memory = None


def answer_stream(vlm, image: str, question: str, cfg: AnswerConfig = AnswerConfig()) -> Iterator[str]:
    """The answer to one question, piece by piece as it is generated (decoded text deltas)."""
    if not question.strip():
        raise UserError("the question is empty")
    pixels = load_image(vlm, image)[None]
    tokens: list[int] = []
    said = ""
    eos = vlm.tokenizer.eos_token_id
    for token in generate(vlm, pixels, [question], cfg):
        if int(token[0]) == eos:
            break
        tokens.append(int(token[0]))
        text = vlm.tokenizer.decode(tokens, skip_special_tokens=True)
        if len(text) > len(said):
            yield text[len(said) :]
            said = text


def answer_batch(
    vlm, images: list[str], questions: list[str], cfg: AnswerConfig = AnswerConfig(), progress: bool = False
) -> list[str]:
    """One answer per (image, question), in batches of cfg.batch_size; unreadable images raise UserError."""
    from retrieval.progress import progress_bar

    answers: list[str] = []
    eos = vlm.tokenizer.eos_token_id
    bar = progress_bar(desc="ask", unit="q", enabled=progress, total=len(questions))
    for start in range(0, len(questions), cfg.batch_size):
        qs = questions[start : start + cfg.batch_size]
        pixels = torch.stack([load_image(vlm, p) for p in images[start : start + cfg.batch_size]])
        steps = [t for t in generate(vlm, pixels, qs, cfg)]
        ids = torch.stack(steps, 1) if steps else torch.zeros(len(qs), 0, dtype=torch.long)  # (B, n)
        for row in ids.tolist():
            row = row[: row.index(eos)] if eos in row else row
            answers.append(vlm.tokenizer.decode(row, skip_special_tokens=True).strip())
        bar.update(len(qs))
    bar.close()
    return answers

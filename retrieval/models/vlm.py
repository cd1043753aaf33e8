"""The VLM: a vision tower's patch tokens -> a connector -> a causal LLM's input embeddings.

The prompt carries one image placeholder; `splice` puts the projected image tokens where it stands. Prompt and
image positions are masked out of the labels (-100), so the loss is on the answer tokens alone. The tokenizer's
chat template is used where it has one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from retrieval.errors import UserError
from retrieval.models.llm import Llm
from retrieval.models.projector import Connector
from retrieval.models.towers import encode_image_tokens
from retrieval.models.xattn import XattnState, insert_cross_attention

PLACEHOLDER = "<image>"
IMAGE_ID = -200  # stands for the image in a list of token ids; never a real token
IGNORE = -100  # label of a position without loss


@dataclass(frozen=True)
class PromptConfig:
    system: str = "Answer in one word."  # short: every token of it is paid for in every training step
    template: str = "<image>\n{question}"  # the user turn; must hold the image placeholder once
    caption: str = "Describe the image."  # the question of stage-1 (caption) rows


@dataclass
class Spliced:
    embeds: Tensor  # (B, T, D)
    attention_mask: Tensor  # (B, T) 1 for real positions
    position_ids: Tensor  # (B, T)
    labels: Tensor  # (B, T) the token id at answer positions, IGNORE elsewhere
    after_image: Tensor  # (B, T) 1 at the image and every position after it (what may attend to it)


def splice(
    ids: list[list[int]],
    targets: list[list[bool]] | None,
    image_embeds: Tensor,
    embed: nn.Module,
    pad_left: bool = False,
) -> Spliced:
    """ids: per example, token ids with one IMAGE_ID; targets: per example, True where a token is learned.
    image_embeds (B, K, D) replaces each IMAGE_ID by K positions (K may be 0). Pads right (training) or left
    (generation: every last position is the prompt's end)."""
    if len(ids) != image_embeds.shape[0]:
        raise ValueError(f"{len(ids)} prompts for {image_embeds.shape[0]} images")
    seqs, labels, afters = [], [], []
    k = image_embeds.shape[1]
    for b, row in enumerate(ids):
        if row.count(IMAGE_ID) != 1:
            raise UserError(
                f"a prompt needs exactly one {PLACEHOLDER} placeholder; found {row.count(IMAGE_ID)}"
            )
        at = row.index(IMAGE_ID)
        text = torch.tensor([t for t in row if t != IMAGE_ID], device=image_embeds.device)
        e = embed(text)  # (L, D)
        seqs.append(torch.cat([e[:at], image_embeds[b].to(e.dtype), e[at:]]))  # (L + K, D)
        learn = targets[b] if targets is not None else [False] * len(row)
        lab = [t if keep else IGNORE for t, keep in zip(row, learn, strict=True) if t != IMAGE_ID]
        labels.append(lab[:at] + [IGNORE] * k + lab[at:])
        afters.append([0] * at + [1] * (len(lab) - at + k))
    n, width = max(len(s) for s in seqs), image_embeds.shape[-1]
    dev, dtype = image_embeds.device, seqs[0].dtype
    out = torch.zeros(len(seqs), n, width, device=dev, dtype=dtype)
    mask = torch.zeros(len(seqs), n, dtype=torch.long, device=dev)
    lab_t = torch.full((len(seqs), n), IGNORE, dtype=torch.long, device=dev)
    after_t = torch.zeros(len(seqs), n, dtype=torch.long, device=dev)
    for b, s in enumerate(seqs):
        span = slice(n - len(s), n) if pad_left else slice(0, len(s))
        out[b, span], mask[b, span] = s, 1
        lab_t[b, span] = torch.tensor(labels[b], device=dev)
        after_t[b, span] = torch.tensor(afters[b], device=dev)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, T) left padding starts each prompt at 0
    return Spliced(out, mask, positions, lab_t, after_t)


class Vlm(nn.Module):
    """vision (an OpenCLIP model, frozen; None for the patches connector) + connector + LLM."""

    def __init__(
        self, llm: Llm, connector: Connector, vision: nn.Module | None, prompt: PromptConfig, image: dict
    ) -> None:
        super().__init__()
        self.llm, self.tokenizer, self.llm_identity = llm.model, llm.tokenizer, llm.identity
        self.connector, self.vision, self.prompt, self.image = connector, vision, prompt, image
        self.xattn: nn.ModuleList | None = None
        self.xstate: XattnState | None = None
        if connector.cfg.type == "xattn":
            self.xattn, self.xstate = insert_cross_attention(
                self.llm, connector.cfg.every, connector.cfg.heads, llm.width
            )
        self.llm.requires_grad_(False)  # frozen unless training turns parts of it on (LoRA, full)
        if vision is not None:
            vision.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> Vlm:
        super().train(mode)
        if self.vision is not None:
            self.vision.eval()  # frozen: its outputs are cached as computed in eval mode
        return self

    @torch.no_grad()
    def features(self, pixels: Tensor) -> Tensor:
        """Normalised pixels (B, 3, S, S) -> what the connector reads: patch tokens (B, N, Wv) of the frozen tower,
        or the pixels themselves for the patches connector. Exact to cache: nothing here trains."""
        if not self.connector.needs_vision:
            return pixels
        return encode_image_tokens(self.vision, pixels)[1].float()

    def encode(self, question: str, answer: str | None = None) -> tuple[list[int], list[bool]]:
        """Token ids of a one-turn chat (IMAGE_ID where the image goes) and which of them are learned."""
        return self.encode_turns([(question, answer)])

    def encode_turns(self, turns: list[tuple[str, str | None]]) -> tuple[list[int], list[bool]]:
        """A chat of (question, answer) turns about one image, the image in the first (LLaVA's multi-turn
        conversations: the image tokens are paid once for several answers). Only answers are learned; a last
        answer of None leaves the chat open for generation."""
        question = turns[0][0]
        user = question if PLACEHOLDER in question else self.prompt.template.replace("{question}", question)
        if user.count(PLACEHOLDER) != 1:
            raise UserError(
                f"the prompt {user!r} needs exactly one {PLACEHOLDER} placeholder (see the template)"
            )
        questions = [user] + [q.replace(PLACEHOLDER, "") for q, _ in turns[1:]]
        messages = [{"role": "system", "content": self.prompt.system}] if self.prompt.system else []
        segments: list[tuple[str, bool]] = []
        said = ""
        for q, (_, answer) in zip(questions, turns, strict=True):
            messages.append({"role": "user", "content": q})
            prompt = self._render(messages, open_turn=True)
            segments.append((prompt[len(said) :], False))
            if answer is None:
                break
            messages.append({"role": "assistant", "content": answer})
            said = self._render(messages, open_turn=False)
            if not said.startswith(prompt):
                raise UserError("the tokenizer's chat template does not extend an open turn with the answer")
            segments.append((said[len(prompt) :], True))
        tok = self.tokenizer
        ids: list[int] = []
        learn: list[bool] = []
        for text, learned in segments:
            parts = text.split(PLACEHOLDER)
            for i, part in enumerate(parts):
                if i:
                    ids.append(IMAGE_ID)
                    learn.append(False)
                piece = tok.encode(part, add_special_tokens=False)
                ids += piece
                learn += [learned] * len(piece)
            if learned and not getattr(tok, "chat_template", None):
                ids.append(tok.eos_token_id)
                learn.append(True)
        return ids, learn

    def _render(self, messages: list[dict[str, str]], open_turn: bool) -> str:
        """The chat as text: the tokenizer's template, or plain lines ending in 'Answer:' without one."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn)
        lines = []
        for m in messages:
            lines.append(f"{m['content']}\nAnswer:" if m["role"] == "user" else f" {m['content']}\n")
        text = "".join(lines)
        return text if open_turn or messages[-1]["role"] == "assistant" else text

    def splice_batch(
        self, feats: Tensor, ids: list[list[int]], targets=None, pad_left: bool = False
    ) -> Spliced:
        tokens = self.connector(feats)  # (B, K, D), or the xattn memory (B, N, D)
        image = tokens[:, :0] if self.xattn is not None else tokens
        s = splice(ids, targets, image, self.llm.get_input_embeddings(), pad_left)
        if self.xstate is not None:
            self.xstate.memory, self.xstate.mask = tokens, s.after_image
        return s

    def loss(self, feats: Tensor, ids: list[list[int]], targets: list[list[bool]]) -> Tensor:
        """Mean cross-entropy over the answer tokens; the LM head runs on those positions only."""
        s = self.splice_batch(feats, ids, targets)
        hidden = self.llm.base_model(
            inputs_embeds=s.embeds, attention_mask=s.attention_mask, position_ids=s.position_ids
        ).last_hidden_state  # (B, T, D)
        labels = s.labels[:, 1:]  # the token at t + 1 is what position t predicts
        keep = labels != IGNORE
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][keep])  # (n, V)
        return nn.functional.cross_entropy(logits.float(), labels[keep])

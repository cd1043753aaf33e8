"""Flamingo-style gated cross-attention inside a frozen causal LLM.

A block (cross-attention to the image memory, then a feed-forward layer, each added through tanh(gate) with the
gates initialised at zero) is inserted before every M-th decoder layer. With the gates at zero the model computes
exactly what the LLM alone computes, so training starts from the LLM and opens the image path gradually.

Text positions before the image placeholder do not attend to the image (Flamingo: a token sees only the image that
precedes it); the caller sets the memory and that mask on the shared `XattnState` before each forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from retrieval.errors import UserError


@dataclass
class XattnState:
    memory: Tensor | None = None  # (B, N, D) projected patch tokens
    mask: Tensor | None = None  # (B, T) 1 where a text position may attend to the image; None: everywhere


class GatedCrossAttention(nn.Module):
    """h -> h + tanh(a) * attn(norm(h), memory) ; h -> h + tanh(f) * ff(norm(h)), masked per text position."""

    def __init__(self, width: int, heads: int, state: XattnState) -> None:
        super().__init__()
        self.norm_attn, self.norm_ff = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.gate_attn = nn.Parameter(torch.zeros(()))
        self.gate_ff = nn.Parameter(torch.zeros(()))
        self.state = [state]  # a list: the state is shared, never a submodule or parameter of this block

    def forward(self, h: Tensor) -> Tensor:
        state = self.state[0]
        if state.memory is None:
            return h
        mem = state.memory.to(h.dtype)  # (B, N, D)
        keep = 1.0 if state.mask is None else state.mask[:, -h.shape[1] :, None].to(h.dtype)  # (B, T, 1)
        q = self.norm_attn(h)
        h = h + torch.tanh(self.gate_attn) * keep * self.attn(q, mem, mem, need_weights=False)[0]
        return h + torch.tanh(self.gate_ff) * keep * self.ff(self.norm_ff(h))


class WithCrossAttention(nn.Module):
    """A decoder layer with a gated cross-attention block before it; any layer signature passes through."""

    def __init__(self, layer: nn.Module, block: GatedCrossAttention) -> None:
        super().__init__()
        self.layer, self.xattn = layer, block

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        return self.layer(self.xattn(hidden_states), *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)  # attention_type, layer_idx etc. that the LLM reads


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The LLM's list of decoder layers (Llama/Mistral/Qwen: model.layers; GPT-2: transformer.h)."""
    base = getattr(llm, "model", None) or getattr(llm, "transformer", None)
    for name in ("layers", "h"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise UserError(
        f"connector xattn: cannot find the decoder layers of {type(llm).__name__}; use another connector"
    )


def insert_cross_attention(
    llm: nn.Module, every: int, heads: int, width: int
) -> tuple[nn.ModuleList, XattnState]:
    """Wrap every `every`-th decoder layer (the first included) in place; returns (the new blocks, their state)."""
    layers = decoder_layers(llm)
    if every < 1 or width % heads:
        raise UserError(f"connector xattn: every={every}, heads={heads} do not fit an LLM of width {width}")
    state = XattnState()
    blocks = nn.ModuleList()
    for i in range(0, len(layers), every):
        block = GatedCrossAttention(width, heads, state)
        layers[i] = WithCrossAttention(layers[i], block)
        blocks.append(block)
    return blocks, state

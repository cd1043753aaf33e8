"""A tiny random causal LLM and a word-level tokenizer, built offline in a folder: what VLM tests load by path."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "answer in one word describe the image what colour shape size is are there how many shapes small or large "
    "object to left of right above below yes no one two red green blue yellow purple orange circle square "
    "triangle cross a an ? . : , hello capital france paris"
).split()


def make_tiny_llm(folder: Path, seed: int = 0, chat: bool = False, layers: int = 2) -> Path:
    """Write a LlamaForCausalLM (width 32, `layers` layers) and its tokenizer to `folder`; returns it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    if chat:
        fast.chat_template = (
            "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}"
        )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder

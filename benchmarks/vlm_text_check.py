"""Does the LLM still answer plain text after a VLM stage? One text question (no image) answered greedily by the
LLM as loaded and by each VLM checkpoint's LLM (LoRA adapters or tuned weights included).

    python benchmarks/vlm_text_check.py --question "What is the capital of France?" runs/vlm_lora
"""

from __future__ import annotations

import argparse

import torch


@torch.inference_mode()
def text_answer(llm, tokenizer, question: str, max_new_tokens: int = 40) -> str:
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = llm.generate(
        **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    from retrieval.models.llm import load_llm
    from retrieval.models.vlm_checkpoint import load_vlm

    p = argparse.ArgumentParser()
    p.add_argument("checkpoints", nargs="*")
    p.add_argument("--llm", default="smollm2-135m")
    p.add_argument("--question", default="What is the capital of France?")
    args = p.parse_args()
    llm = load_llm(args.llm)
    print(f"{args.llm} as loaded: {text_answer(llm.model, llm.tokenizer, args.question)!r}")
    for ck in args.checkpoints:
        vlm = load_vlm(ck)
        print(f"{ck} ({vlm.llm_identity['name']}): {text_answer(vlm.llm, vlm.tokenizer, args.question)!r}")


if __name__ == "__main__":
    main()

"""Greedy generation samples on a fixed list of prompts."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_samples(
    model, tokenizer, prompts: list[str], max_new_tokens: int
) -> list[dict]:
    """Greedy continuation of each prompt (batch 1, KV cache)."""
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
        text = tokenizer.decode(
            out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True
        )
        samples.append({"prompt": prompt, "output": text})
    return samples

"""Greedy generation from a causal MoE LM, for the held-out generation metric (ROUGE-L).

Prompts are tokenised exactly as the training batches tokenise them (the tokenizer's special
prefix, then the prompt; :mod:`hfedmoe.data.tokenization`), left-padded so every row's next
token comes right after its prompt, and continued by transformers' ``generate`` with greedy
decoding for at most ``max_new_tokens`` tokens (a row stops at its EOS). Only the new tokens
are decoded, special tokens skipped. The model's gate capture and training state are untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hfedmoe.data.tokenization import special_prefix
from hfedmoe.errors import ModelError
from hfedmoe.models.base import MoEModel

__all__ = ["greedy_generate", "prompt_batch"]


def prompt_batch(prompts: Sequence[str], tokenizer: object, max_length: int,
                 pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids``/``attention_mask`` (``(B, T)``) of the prompts, each the
    special prefix plus its prompt, keeping the last ``max_length`` tokens of a longer one."""
    prefix = special_prefix(tokenizer)
    rows = [(prefix + list(ids))[-max_length:] for ids in
            tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]  # type: ignore[operator]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        if row:
            ids[b, width - len(row):] = torch.tensor(row)
            mask[b, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def greedy_generate(model: MoEModel, prompts: Sequence[str], max_length: int,
                    max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """The greedy continuation of every prompt, decoded (special tokens skipped).

    Args:
        model: A causal-LM :class:`MoEModel` with a tokenizer.
        prompts: The prompts, as in training (no chat template is applied).
        max_length: Prompt tokens kept (the last ones), the special prefix included.
        max_new_tokens: Most tokens generated per prompt.
        batch_size: Prompts per ``generate`` call.

    Returns:
        One generated text per prompt, in order.

    Raises:
        ModelError: The model is not a causal LM or has no tokenizer.
    """
    if model.task != "causal-lm":
        raise ModelError(f"generation needs a causal-LM model, not {model.task!r}")
    tok = model.require_tokenizer()
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
    device = next(model.module.parameters()).device
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompt_batch(prompts[start:start + batch_size], tok, max_length, pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        ids = model.module.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    num_beams=1, pad_token_id=pad, eos_token_id=eos)
        new = ids[:, batch["input_ids"].shape[1]:].cpu()  # (B, <= max_new_tokens)
        out.extend(tok.batch_decode(new, skip_special_tokens=True))
    return out

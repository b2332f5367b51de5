"""Server-side evaluation on the held-out split."""

from __future__ import annotations

import math

import torch

from hfedmoe.data import PairDataset, TextDataset, collate, iter_minibatches
from hfedmoe.models.base import MoEModel


@torch.no_grad()
def evaluate(model: MoEModel, data: TextDataset | PairDataset, batch_size: int = 32,
             max_length: int = 128, max_examples: int = 0) -> dict[str, float]:
    """Accuracy and mean loss (classification) or mean loss and perplexity (causal-LM)."""
    n = min(len(data), max_examples) if max_examples else len(data)
    total_loss = correct = count = weight = 0.0
    for idx in iter_minibatches(n, batch_size, shuffle=False):
        batch = collate(data, idx, model.tokenizer, max_length)
        out = model.module(**batch)
        if model.task == "classification":
            correct += float((out.logits.argmax(-1) == batch["labels"]).sum())
            total_loss += float(out.loss) * len(idx)
            weight += len(idx)
        else:  # the loss is a mean over response tokens: weight by their count
            tokens = float((batch["labels"][:, 1:] != -100).sum())
            total_loss += float(out.loss) * tokens
            weight += tokens
        count += len(idx)
    loss = total_loss / max(weight, 1.0)
    if model.task == "classification":
        return {"accuracy": correct / max(count, 1.0), "loss": loss, "examples": int(count)}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "examples": int(count)}

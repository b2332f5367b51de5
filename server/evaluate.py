"""Server-side evaluation on the held-out split.

Classification: accuracy and mean loss. Causal LM (docs/method.md, "Language models"):

- ``loss`` / ``perplexity``: the mean next-token loss over the response tokens of the held-out
  pairs (the training loss: prompts and padding take none), ``exp(loss)``;
- ``per_domain``: the same per domain (the data's label column: the topic of the bundled
  corpus), with the examples and tokens each holds, and each domain's ``rougeL``;
- ``rougeL``: the mean ROUGE-L F-measure (the ``rouge-score`` library, its default
  tokenisation, no stemming) of the greedy continuation of each of the first
  ``generate_examples`` held-out prompts (at most ``max_new_tokens`` new tokens;
  :mod:`hfedmoe.generation`) against its reference response; ``samples``: the first few.

With ``max_examples`` (and for the generated subset) a causal-LM split is taken domain by
domain in turn (:func:`domain_order`), so a small cap still covers every domain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hfedmoe.data import IGNORE_INDEX, PairDataset, TextDataset, collate, iter_minibatches
from hfedmoe.errors import ConfigError
from hfedmoe.models.base import MoEModel

SAMPLES = 3  # generations kept in the metrics row, for the report
SAMPLE_CHARS = 200


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def domain_order(labels: Sequence[int]) -> list[int]:
    """Example indices taking one example of each domain in turn (domains in id order, each
    domain's examples in split order)."""
    by_domain: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_domain.setdefault(int(y), []).append(i)
    queues = [by_domain[d] for d in sorted(by_domain)]
    out: list[int] = []
    for k in range(max((len(q) for q in queues), default=0)):
        out.extend(q[k] for q in queues if k < len(q))
    return out


@torch.no_grad()
def evaluate(model: MoEModel, data: TextDataset | PairDataset, batch_size: int = 32,
             max_length: int = 128, max_examples: int = 0, generate_examples: int = 0,
             max_new_tokens: int = 32) -> dict[str, Any]:
    """Accuracy and mean loss (classification), or loss, perplexity, per-domain figures and
    ROUGE-L (causal LM; ``generate_examples`` 0: no generation) on ``data``."""
    if model.task != "classification":
        return evaluate_lm(model, data, batch_size, max_length, max_examples,
                           generate_examples, max_new_tokens)
    n = min(len(data), max_examples) if max_examples else len(data)
    total_loss = correct = count = 0.0
    for idx in iter_minibatches(n, batch_size, shuffle=False):
        batch = collate(data, idx, model.tokenizer, max_length)
        out = model.module(**batch)
        correct += float((out.logits.argmax(-1) == batch["labels"]).sum())
        total_loss += float(out.loss) * len(idx)
        count += len(idx)
    return {"accuracy": correct / max(count, 1.0), "loss": total_loss / max(count, 1.0),
            "examples": int(count)}


def _row_losses(model: MoEModel, batch: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss and response tokens of every row: ``(B,)`` and ``(B,)``."""
    out = model.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    labels = batch["labels"][:, 1:].to(logits.device)  # (B, T-1)
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                          reduction="none")  # (B, T-1)
    return nll.sum(-1).cpu(), (labels != IGNORE_INDEX).sum(-1).cpu()


def _losses(model: MoEModel, data: PairDataset, order: Sequence[int], batch_size: int,
            max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Per example of ``order``: summed response loss and response tokens."""
    device = next(model.module.parameters()).device
    sums, tokens = [], []
    for start in range(0, len(order), batch_size):
        batch = collate(data, order[start:start + batch_size], model.require_tokenizer(),
                        max_length)
        s, t = _row_losses(model, {k: v.to(device) for k, v in batch.items()})
        sums.append(s.double().numpy())
        tokens.append(t.numpy())
    if not sums:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate(sums), np.concatenate(tokens)


def _loss_figures(sums: np.ndarray, tokens: np.ndarray) -> dict[str, Any]:
    loss = float(sums.sum() / max(int(tokens.sum()), 1))
    return {"loss": loss, "perplexity": perplexity(loss), "examples": int(len(sums)),
            "tokens": int(tokens.sum())}


def evaluate_lm(model: MoEModel, data: PairDataset, batch_size: int = 32, max_length: int = 128,
                max_examples: int = 0, generate_examples: int = 0,
                max_new_tokens: int = 32) -> dict[str, Any]:
    """The causal-LM figures of the module doc on ``data`` (``max_examples`` 0: all of it)."""
    order = domain_order(data.labels)
    if max_examples:
        order = order[:max_examples]
    sums, tokens = _losses(model, data, order, batch_size, max_length)
    labels = np.asarray([data.labels[i] for i in order], dtype=np.int64)
    out: dict[str, Any] = _loss_figures(sums, tokens)
    out["per_domain"] = {name: _loss_figures(sums[labels == d], tokens[labels == d])
                         for d, name in enumerate(data.label_names) if (labels == d).any()}
    if generate_examples:
        out.update(_rouge(model, data, order[:generate_examples], batch_size, max_length,
                          max_new_tokens, out["per_domain"]))
    return out


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of every prediction against its reference (``rouge-score``)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:
        raise ConfigError("ROUGE-L needs the rouge-score package: pip install "
                          "'hfedmoe[server]' (or set eval_generate_examples = 0)") from exc
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(ref, pred)["rougeL"].fmeasure
            for pred, ref in zip(predictions, references, strict=True)]


def _rouge(model: MoEModel, data: PairDataset, order: Sequence[int], batch_size: int,
           max_length: int, max_new_tokens: int,
           per_domain: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``rougeL`` over the prompts of ``order`` (and each domain's, into ``per_domain``)."""
    from hfedmoe.generation import greedy_generate

    prompts = [data.prompts[i] for i in order]
    refs = [data.responses[i] for i in order]
    generated = greedy_generate(model, prompts, max_length, max_new_tokens, batch_size)
    scores = rouge_l(generated, refs)
    domains = [data.label_names[data.labels[i]] for i in order]
    for name in sorted(set(domains)):
        mine = [s for s, d in zip(scores, domains, strict=True) if d == name]
        per_domain[name]["rougeL"] = float(np.mean(mine))
    samples = [{"domain": d, "prompt": p[:SAMPLE_CHARS], "reference": r[:SAMPLE_CHARS],
                "generated": g[:SAMPLE_CHARS], "rougeL": s}
               for d, p, r, g, s in zip(domains, prompts, refs, generated, scores, strict=True)]
    return {"rougeL": float(np.mean(scores)) if scores else 0.0,
            "rougeL_examples": len(scores), "samples": samples[:SAMPLES]}


def held_out_metrics(model: MoEModel, data: TextDataset | PairDataset, cfg: Any) -> dict[str, Any]:
    """:func:`evaluate` with a server config's settings (``eval_batch_size``,
    ``model.max_length``, ``max_eval_examples``, ``eval_generate_examples``,
    ``eval_max_new_tokens``), with the split's name: the coordinator's and the simulator's
    evaluation alike."""
    return {**evaluate(model, data, cfg.eval_batch_size, cfg.model.max_length,
                       cfg.max_eval_examples, cfg.eval_generate_examples,
                       cfg.eval_max_new_tokens),
            "eval_split": cfg.data.eval_split}

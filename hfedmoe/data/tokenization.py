"""Tokenise datasets into model-ready batches.

* :func:`classification_batch` -- ``input_ids``, ``attention_mask`` (``(B, T)``) and ``labels``
  (``(B,)``) from any Hugging Face tokenizer, truncated to ``max_length`` and padded to the
  longest text of the batch (or to ``max_length``).
* :func:`causal_lm_batch` -- ``input_ids``, ``attention_mask`` and ``labels`` (all ``(B, T)``)
  for causal-LM fine-tuning where the loss is taken **only on the response**: ``labels`` is
  ``-100`` on the prompt and on padding, and equals ``input_ids`` on the response tokens and the
  closing EOS. Labels are not shifted; Hugging Face causal-LM heads shift them internally.

Causal-LM layout of one example::

    [special prefix] prompt tokens | response tokens [eos] | padding
    labels: -100 ... -100          | response tokens [eos] | -100

The special prefix is whatever the tokenizer puts before a single text (BOS for Llama-style
tokenizers, nothing for GPT-2-style ones); it is found by tokenising a probe with and without
special tokens, so any tokenizer works. Padding uses ``pad_token_id``, else ``eos_token_id``, else
0 (the value does not matter: the mask and ``-100`` hide it), on ``tokenizer.padding_side``.

Truncation keeps the response when it can: an example longer than ``max_length`` keeps
``max(max_length - len(response), min(len(prompt), max_length // 2))`` prompt tokens from the
start, and fills the rest with the start of the response.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from hfedmoe.data.dataset import PairDataset, TextDataset
from hfedmoe.errors import DataError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IGNORE_INDEX", "causal_lm_batch", "classification_batch", "collate", "fit_prompts",
           "special_prefix"]

IGNORE_INDEX = -100  # labels with this value take no loss (torch CrossEntropyLoss default)
_PROBE = "probe"


def _check_length(max_length: int) -> None:
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")


def classification_batch(texts: Sequence[str], labels: Sequence[int],
                         tokenizer: PreTrainedTokenizerBase, max_length: int,
                         pad_to_max_length: bool = False) -> dict[str, torch.Tensor]:
    """Tokenise texts and class ids into a classification batch.

    Args:
        texts: The input texts.
        labels: One class id per text.
        tokenizer: Any Hugging Face tokenizer.
        max_length: Longest sequence kept (tokens, special tokens included).
        pad_to_max_length: Pad to ``max_length`` instead of the longest text in the batch.

    Returns:
        ``input_ids`` and ``attention_mask`` of shape ``(B, T)``, ``labels`` of shape ``(B,)``.
    """
    _check_length(max_length)
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    enc = tokenizer(list(texts), padding="max_length" if pad_to_max_length else True,
                    truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(),  # (B, T)
            "attention_mask": enc["attention_mask"].long(),  # (B, T)
            "labels": torch.as_tensor(list(labels), dtype=torch.long)}  # (B,)


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids the tokenizer puts before a single text (e.g. ``[bos]``; maybe none)."""
    full = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    core = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    for start in range(len(full) - len(core) + 1):
        if full[start:start + len(core)] == core:
            return list(full[:start])
    return []


def _truncate(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    keep = max(max_length - len(response), min(len(prompt), max_length // 2))
    return prompt[:keep], response[:max_length - keep]


def fit_prompts(data: PairDataset, tokenizer: PreTrainedTokenizerBase, max_length: int,
                policy: str = "error", split: str = "training") -> PairDataset:
    """``data`` where every prompt leaves room for its response within ``max_length``.

    A prompt fits when its tokens, with the tokenizer's special prefix, are fewer than
    ``max_length`` (at least one response token is left to take the loss on).

    Args:
        data: Prompt/response pairs.
        tokenizer: The model's tokenizer.
        max_length: ``model.max_length``.
        policy: ``"error"`` raises on the first prompt that does not fit; ``"drop"`` leaves
            such pairs out (``data.long_prompts``).
        split: The split's name, for the error message.

    Raises:
        DataError: (policy ``"error"``) a prompt that does not fit, naming its position in the
            split, its domain, its start, its length and the settings that fix it.
    """
    if tokenizer is None:
        raise ModelError("the model has no tokenizer, so its examples cannot be tokenised")
    if not len(data):
        return data
    prefix = len(special_prefix(tokenizer))
    lengths = [prefix + len(ids) for ids in
               tokenizer(list(data.prompts), add_special_tokens=False)["input_ids"]]
    long = [i for i, n in enumerate(lengths) if n >= max_length]
    if not long or policy == "drop":
        return data.subset([i for i in range(len(data)) if i not in set(long)]) if long else data
    i = long[0]
    start = data.prompts[i][:60] + ("..." if len(data.prompts[i]) > 60 else "")
    raise DataError(f"example {i} of the {split} split (domain "
                    f"{data.label_names[data.labels[i]]!r}, prompt {start!r}): the prompt is "
                    f"{lengths[i]} tokens, which leaves no room for its response within "
                    f"model.max_length = {max_length} ({len(long)} prompt(s) of {len(data)} "
                    f"are that long, the longest {max(lengths)} tokens); raise "
                    f"model.max_length or set data.long_prompts = \"drop\" to leave them out")


def causal_lm_batch(prompts: Sequence[str], responses: Sequence[str],
                    tokenizer: PreTrainedTokenizerBase, max_length: int,
                    pad_to_max_length: bool = False) -> dict[str, torch.Tensor]:
    """Tokenise prompt/response pairs into a causal-LM batch with loss on the response only.

    Args:
        prompts: The prompts (no loss).
        responses: The responses (loss on every token and the closing EOS).
        tokenizer: Any Hugging Face tokenizer of a causal LM.
        max_length: Longest sequence kept (tokens, special tokens included).
        pad_to_max_length: Pad to ``max_length`` instead of the longest example in the batch.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each of shape ``(B, T)``.
    """
    _check_length(max_length)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    prefix = special_prefix(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    rows = [_truncate(prefix + list(p), list(r) + eos, max_length)
            for p, r in zip(p_ids, r_ids, strict=True)]
    width = max_length if pad_to_max_length else max(len(p) + len(r) for p, r in rows)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    input_ids = np.full((len(rows), width), pad, dtype=np.int64)  # (B, T)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)  # (B, T)
    mask = np.zeros((len(rows), width), dtype=np.int64)  # (B, T)
    for b, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        start = width - n if left else 0
        input_ids[b, start:start + n] = p + r
        labels[b, start + len(p):start + n] = r
        mask[b, start:start + n] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels)}


def collate(dataset: TextDataset | PairDataset, indices: Sequence[int] | np.ndarray,
            tokenizer: PreTrainedTokenizerBase, max_length: int,
            pad_to_max_length: bool = False) -> dict[str, torch.Tensor]:
    """The batch of ``dataset`` at ``indices``, for the dataset's task.

    Args:
        dataset: A classification or a prompt/response dataset.
        indices: Example indices (e.g. one minibatch from :func:`iter_minibatches`).
        tokenizer: Any Hugging Face tokenizer.
        max_length: Longest sequence kept.
        pad_to_max_length: Pad to ``max_length`` instead of the longest example.

    Returns:
        :func:`classification_batch` or :func:`causal_lm_batch` of those examples.

    Raises:
        ModelError: ``tokenizer`` is None (a model without a tokenizer).
    """
    if tokenizer is None:
        raise ModelError("the model has no tokenizer, so its examples cannot be tokenised; "
                         "save the tokenizer into the checkpoint directory "
                         "(tokenizer.save_pretrained(dir)): the kit downloads nothing")
    idx = [int(i) for i in indices]
    if isinstance(dataset, TextDataset):
        return classification_batch([dataset.texts[i] for i in idx],
                                    [dataset.labels[i] for i in idx], tokenizer, max_length,
                                    pad_to_max_length)
    return causal_lm_batch([dataset.prompts[i] for i in idx],
                           [dataset.responses[i] for i in idx], tokenizer, max_length,
                           pad_to_max_length)

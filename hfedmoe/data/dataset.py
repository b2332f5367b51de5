"""Typed in-memory datasets and the label vocabulary.

Two dataset values cover the kit's tasks:

* :class:`TextDataset` -- texts with integer class ids (sequence classification);
* :class:`PairDataset` -- prompt/response pairs for causal-LM fine-tuning. A pair dataset also
  carries a group label per example (the topic, for the bundled corpus) so the same non-IID
  partitioners apply to both tasks; a file without a label column gets the single group ``"all"``.

Both are frozen: :meth:`subset` returns a new value and keeps the label vocabulary, so a client's
shard and the server's test split always agree on what class id ``k`` means.

Class ids come from :func:`build_label_vocab`: the distinct raw labels sorted (numerically for
integers, by code point for strings) and numbered from 0. The vocabulary is therefore stable:
the same set of labels always gives the same ids, whatever the order of the rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RawLabel = int | str

__all__ = ["PairDataset", "RawLabel", "TextDataset", "build_label_vocab", "encode_labels"]


def build_label_vocab(raw: Sequence[RawLabel]) -> tuple[RawLabel, ...]:
    """The sorted distinct labels; position ``k`` in the result is class id ``k``.

    Args:
        raw: Raw labels, all ``int`` or all ``str`` (the readers guarantee one kind).

    Returns:
        The distinct labels in ascending order.
    """
    return tuple(sorted(set(raw)))  # type: ignore[type-var]


def encode_labels(raw: Sequence[RawLabel]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Map raw labels to contiguous class ids with a sorted vocabulary.

    Args:
        raw: Raw labels, all ``int`` or all ``str``.

    Returns:
        ``(ids, label_names)``: one class id per input label, and the name of every class id
        (``str(label)`` for integer labels).
    """
    vocab = build_label_vocab(raw)
    index = {label: k for k, label in enumerate(vocab)}
    return tuple(index[r] for r in raw), tuple(str(v) for v in vocab)


def _check_labels(labels: Sequence[int], label_names: Sequence[str], n: int, what: str) -> None:
    if len(labels) != n:
        raise ValueError(f"{what}: {len(labels)} labels for {n} examples")
    if not label_names:
        raise ValueError(f"{what}: label_names must not be empty")
    if len(set(label_names)) != len(label_names):
        raise ValueError(f"{what}: label_names must be distinct")
    bad = [y for y in labels if not 0 <= y < len(label_names)]
    if bad:
        raise ValueError(f"{what}: class id {bad[0]} outside [0, {len(label_names)})")


class _Labelled:
    """Label helpers shared by both dataset kinds (``labels`` index ``label_names``)."""

    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        """Size of the label vocabulary (also labels with no example in this subset)."""
        return len(self.label_names)

    def label_array(self) -> np.ndarray:
        """Label ids as an ``int64`` array of shape ``(len(self),)``."""
        return np.asarray(self.labels, dtype=np.int64)

    def label_counts(self) -> dict[str, int]:
        """Examples per label name, for every label in the vocabulary."""
        counts = Counter(self.labels)
        return {name: counts.get(k, 0) for k, name in enumerate(self.label_names)}


@dataclass(frozen=True, eq=False)
class TextDataset(_Labelled):
    """Texts with class ids, for sequence classification.

    Attributes:
        texts: One input text per example.
        labels: Class id of each example, in ``[0, num_labels)``.
        label_names: Name of each class id (the sorted label vocabulary).
    """

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "labels", tuple(int(y) for y in self.labels))
        object.__setattr__(self, "label_names", tuple(self.label_names))
        _check_labels(self.labels, self.label_names, len(self.texts), "TextDataset")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        """The examples at ``indices`` (in that order), with the same vocabulary."""
        idx = [int(i) for i in indices]
        return TextDataset(tuple(self.texts[i] for i in idx),
                           tuple(self.labels[i] for i in idx), self.label_names)


@dataclass(frozen=True, eq=False)
class PairDataset(_Labelled):
    """Prompt/response pairs for causal-LM fine-tuning, with a group label per pair.

    Attributes:
        prompts: The prompt of each example (no loss is taken on it).
        responses: The response of each example (the loss is taken on it).
        labels: Group id of each example (topic), used only to partition and to stratify.
        label_names: Name of each group id.
    """

    prompts: tuple[str, ...]
    responses: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "responses", tuple(self.responses))
        object.__setattr__(self, "labels", tuple(int(y) for y in self.labels))
        object.__setattr__(self, "label_names", tuple(self.label_names))
        if len(self.prompts) != len(self.responses):
            raise ValueError(f"PairDataset: {len(self.prompts)} prompts but "
                             f"{len(self.responses)} responses")
        _check_labels(self.labels, self.label_names, len(self.prompts), "PairDataset")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> PairDataset:
        """The examples at ``indices`` (in that order), with the same vocabulary."""
        idx = [int(i) for i in indices]
        return PairDataset(tuple(self.prompts[i] for i in idx),
                           tuple(self.responses[i] for i in idx),
                           tuple(self.labels[i] for i in idx), self.label_names)

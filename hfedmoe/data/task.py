"""A federated task from a :class:`~hfedmoe.config.DataConfig`, and seeded minibatches.

:func:`load_task` resolves ``cfg.source`` (``"chatterbot"`` for the bundled corpus, or a path to
a ``.jsonl``/``.csv``/``.parquet`` file or a ``save_to_disk`` directory), builds the dataset for
``cfg.task``, and takes the server's stratified test split (``cfg.test_fraction``, ``cfg.seed``)
before anything is partitioned. :meth:`Task.partition` then spreads the training split over the
clients with ``cfg.partition``, ``cfg.alpha`` and ``cfg.labels_per_client``.

:func:`iter_minibatches` yields index arrays, which is all a training loop needs::

    for idx in iter_minibatches(len(shard), batch_size=8, seed=cfg.seed, epoch=epoch):
        batch = collate(shard, idx, tokenizer, max_length)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from hfedmoe.config import DataConfig
from hfedmoe.data.chatterbot import chatterbot_classification, chatterbot_pairs
from hfedmoe.data.dataset import PairDataset, TextDataset
from hfedmoe.data.partition import partition, stratified_split
from hfedmoe.data.readers import load_pair_file, load_text_file

__all__ = ["BUILTIN_SOURCES", "Task", "iter_minibatches", "load_dataset", "load_task"]

BUILTIN_SOURCES = ("chatterbot",)


@dataclass(frozen=True, eq=False)
class Task:
    """A dataset split into the clients' training pool and the server's test set.

    Attributes:
        train: Training examples (to be partitioned over clients).
        test: The server's held-out examples, never given to a client.
        label_names: The label vocabulary shared by both splits.
        cfg: The data config the task was built from.
    """

    train: TextDataset | PairDataset
    test: TextDataset | PairDataset
    label_names: tuple[str, ...]
    cfg: DataConfig

    @property
    def num_labels(self) -> int:
        """Number of classes (classification) or groups (causal LM)."""
        return len(self.label_names)

    def partition(self, num_clients: int) -> list[np.ndarray]:
        """Indices into :attr:`train` for each client, from the config's partition settings."""
        return partition(self.train.labels, num_clients, self.cfg.partition,
                         alpha=self.cfg.alpha, labels_per_client=self.cfg.labels_per_client,
                         seed=self.cfg.seed)

    def client_datasets(self, num_clients: int) -> list[TextDataset | PairDataset]:
        """Each client's shard of :attr:`train` (see :meth:`partition`)."""
        return [self.train.subset(idx) for idx in self.partition(num_clients)]


def load_dataset(cfg: DataConfig) -> TextDataset | PairDataset:
    """The whole dataset named by ``cfg.source`` for ``cfg.task`` (before any split).

    Raises:
        DataError: The source is unknown or a file is bad (naming the file and row).
    """
    if cfg.source == "chatterbot":
        return chatterbot_classification() if cfg.task == "classification" else chatterbot_pairs()
    if cfg.task == "classification":
        return load_text_file(cfg.source, cfg.text_column, cfg.label_column)
    return load_pair_file(cfg.source, cfg.prompt_column, cfg.response_column, cfg.label_column)


def load_task(cfg: DataConfig) -> Task:
    """Load ``cfg.source`` and hold out the server's stratified test split.

    Args:
        cfg: Source, task, column names, test fraction and seed.

    Returns:
        The train/test split and the label names; deterministic for a given config.

    Raises:
        DataError: The source is unknown or a file is bad (naming the file and row).
    """
    data = load_dataset(cfg)
    train_idx, test_idx = stratified_split(data.labels, cfg.test_fraction, cfg.seed)
    return Task(data.subset(train_idx), data.subset(test_idx), data.label_names, cfg)


def iter_minibatches(num_examples: int, batch_size: int, *, seed: int = 0, epoch: int = 0,
                     shuffle: bool = True, drop_last: bool = False) -> Iterator[np.ndarray]:
    """Yield minibatches of example indices, shuffled by ``(seed, epoch)``.

    Args:
        num_examples: Size of the dataset.
        batch_size: Indices per minibatch (the last may be shorter unless ``drop_last``).
        seed: Seed of the shuffle; with ``epoch`` it fixes the order.
        epoch: Epoch number, so that every epoch has its own order.
        shuffle: Shuffle; otherwise the indices come in order.
        drop_last: Drop a last minibatch shorter than ``batch_size``.

    Yields:
        ``int64`` index arrays of shape ``(batch_size,)`` (the last one maybe shorter).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    order = (np.random.default_rng([seed, epoch]).permutation(num_examples) if shuffle
             else np.arange(num_examples, dtype=np.int64))
    for start in range(0, num_examples, batch_size):
        chunk = order[start:start + batch_size]
        if drop_last and chunk.size < batch_size:
            return
        yield chunk

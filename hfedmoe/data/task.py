"""A federated task from a :class:`~hfedmoe.config.DataConfig`, and seeded minibatches.

:func:`load_task` resolves ``cfg.source`` (``"chatterbot"`` for the bundled corpus,
``"fortunes"`` for Debian's fortune cookies, or a path to a ``.jsonl``/``.csv``/``.parquet`` file
or a ``save_to_disk`` directory), builds the dataset for ``cfg.task``, and takes the server's
stratified test split (``cfg.test_fraction``, ``cfg.seed``) before anything is partitioned. With
``cfg.validation_fraction > 0`` a stratified validation split then comes out of what is left
(the test split is the same as without it). :meth:`Task.partition` spreads the remaining
training split over the clients with ``cfg.partition``, ``cfg.alpha`` and
``cfg.labels_per_client``; :attr:`Task.held_out` is the split the server evaluates on
(``cfg.eval_split``).

:func:`iter_minibatches` yields index arrays, which is all a training loop needs::

    for idx in iter_minibatches(len(shard), batch_size=8, seed=cfg.seed, epoch=epoch):
        batch = collate(shard, idx, tokenizer, max_length)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from hfedmoe.config import DataConfig
from hfedmoe.data.chatterbot import chatterbot_classification, chatterbot_pairs
from hfedmoe.data.dataset import PairDataset, TextDataset
from hfedmoe.data.fortunes import fortunes_classification
from hfedmoe.data.partition import partition, stratified_split
from hfedmoe.data.readers import load_pair_file, load_text_file
from hfedmoe.data.tokenization import fit_prompts
from hfedmoe.errors import DataError

__all__ = ["BUILTIN_SOURCES", "Task", "fit_task", "iter_minibatches", "load_dataset", "load_task",
           "validation_seed"]

BUILTIN_SOURCES = ("chatterbot", "fortunes")


@dataclass(frozen=True, eq=False)
class Task:
    """A dataset split into the clients' training pool and the server's held-out sets.

    Attributes:
        train: Training examples (to be partitioned over clients).
        test: The server's held-out test examples, never given to a client.
        validation: Held-out validation examples, never given to a client (empty when
            ``cfg.validation_fraction`` is 0).
        label_names: The label vocabulary shared by all splits.
        cfg: The data config the task was built from.
    """

    train: TextDataset | PairDataset
    test: TextDataset | PairDataset
    validation: TextDataset | PairDataset
    label_names: tuple[str, ...]
    cfg: DataConfig

    @property
    def held_out(self) -> TextDataset | PairDataset:
        """The split the server evaluates on: :attr:`test` or :attr:`validation`, as
        ``cfg.eval_split`` says."""
        return self.validation if self.cfg.eval_split == "validation" else self.test

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
    if cfg.source == "fortunes":
        if cfg.task != "classification":
            raise DataError("the 'fortunes' dataset is a classification task (texts and "
                            "categories, no responses); use data.task = \"classification\"")
        return fortunes_classification()
    if cfg.task == "classification":
        return load_text_file(cfg.source, cfg.text_column, cfg.label_column)
    return load_pair_file(cfg.source, cfg.prompt_column, cfg.response_column, cfg.label_column,
                          cfg.text_column)


def validation_seed(seed: int) -> int:
    """The seed of the validation split, derived from ``data.seed`` (not the test split's)."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])


def load_task(cfg: DataConfig) -> Task:
    """Load ``cfg.source`` and hold out the server's stratified test and validation splits.

    The test split is taken first, exactly as without a validation split; the validation split
    (``cfg.validation_fraction`` of the whole, stratified, seeded by :func:`validation_seed`)
    then comes out of the remaining pool, and what is left is the clients' training split.

    Args:
        cfg: Source, task, column names, test and validation fractions and seed.

    Returns:
        The train/test/validation splits and the label names; deterministic for a given config.

    Raises:
        DataError: The source is unknown or a file is bad (naming the file and row).
    """
    data = load_dataset(cfg)
    train_idx, test_idx = stratified_split(data.labels, cfg.test_fraction, cfg.seed)
    pool, test = data.subset(train_idx), data.subset(test_idx)
    if cfg.validation_fraction == 0:
        return Task(pool, test, test.subset([]), data.label_names, cfg)
    fraction = cfg.validation_fraction / (1.0 - cfg.test_fraction)
    keep_idx, val_idx = stratified_split(pool.labels, fraction, validation_seed(cfg.seed))
    return Task(pool.subset(keep_idx), test, pool.subset(val_idx), data.label_names, cfg)


def fit_task(task: Task, tokenizer: Any, max_length: int) -> Task:
    """``task`` with every causal-LM split checked against ``max_length``
    (:func:`~hfedmoe.data.tokenization.fit_prompts`, policy ``data.long_prompts``); a
    classification task as it is.

    Raises:
        DataError: a prompt that leaves no room for its response (policy ``"error"``).
    """
    if task.cfg.task != "causal-lm":
        return task
    policy = task.cfg.long_prompts
    return dataclasses.replace(
        task, train=fit_prompts(task.train, tokenizer, max_length, policy, "training"),
        test=fit_prompts(task.test, tokenizer, max_length, policy, "test"),
        validation=fit_prompts(task.validation, tokenizer, max_length, policy, "validation"))


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

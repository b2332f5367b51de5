"""Datasets, tokenisation and non-IID partitioning.

Modules:

* :mod:`~hfedmoe.data.dataset` -- :class:`TextDataset`, :class:`PairDataset`, the sorted label
  vocabulary;
* :mod:`~hfedmoe.data.readers` -- JSONL/CSV/Parquet/``save_to_disk`` readers whose errors name
  the file and the line/row;
* :mod:`~hfedmoe.data.chatterbot` -- the bundled English ChatterBot corpus (source
  ``"chatterbot"``);
* :mod:`~hfedmoe.data.fortunes` -- the fortune cookies of Debian's ``fortunes`` packages as
  topic classification (source ``"fortunes"``; ``$HFEDMOE_FORTUNES_DIR`` names another
  directory);
* :mod:`~hfedmoe.data.partition` -- the server's stratified test split and the
  Dirichlet/IID/k-labels client partition;
* :mod:`~hfedmoe.data.tokenization` -- classification and response-only causal-LM batches;
* :mod:`~hfedmoe.data.task` -- :func:`load_task` from a ``DataConfig`` (train, test and
  validation splits) and seeded minibatches.
"""

from hfedmoe.data.chatterbot import chatterbot_classification, chatterbot_pairs
from hfedmoe.data.dataset import PairDataset, TextDataset, build_label_vocab, encode_labels
from hfedmoe.data.fortunes import fortunes_classification, read_fortunes
from hfedmoe.data.partition import (
    label_histogram,
    mean_label_entropy,
    partition,
    stratified_split,
)
from hfedmoe.data.readers import detect_format, load_pair_file, load_text_file, read_records
from hfedmoe.data.task import Task, fit_task, iter_minibatches, load_dataset, load_task
from hfedmoe.data.tokenization import (
    IGNORE_INDEX,
    causal_lm_batch,
    classification_batch,
    collate,
    fit_prompts,
)

__all__ = [
    "IGNORE_INDEX",
    "PairDataset",
    "Task",
    "TextDataset",
    "build_label_vocab",
    "causal_lm_batch",
    "fit_prompts",
    "fit_task",
    "chatterbot_classification",
    "chatterbot_pairs",
    "classification_batch",
    "collate",
    "detect_format",
    "encode_labels",
    "fortunes_classification",
    "iter_minibatches",
    "label_histogram",
    "load_dataset",
    "load_pair_file",
    "load_task",
    "load_text_file",
    "mean_label_entropy",
    "partition",
    "read_fortunes",
    "read_records",
    "stratified_split",
]

"""The server's held-out test split and the non-IID partition of the rest over clients.

All functions are pure: labels and a seed in, index arrays out (``numpy.random.default_rng``).

* :func:`stratified_split` takes the server-side test split *before* partitioning: the test
  size ``round(n * test_fraction)`` (at least 1) is apportioned over the classes by largest
  remainder of ``n_c * test_fraction``, and every class keeps at least one training example.
* :func:`partition` spreads the training examples over clients in one of three modes:

  - ``"dirichlet"`` (Hsu et al., 2019): for every class ``c``, client proportions
    ``p_c ~ Dir(alpha * 1_C)``; the class' shuffled examples are cut at ``cumsum(p_c) * n_c``.
    Small ``alpha`` gives each client few classes, large ``alpha`` approaches IID.
  - ``"iid"``: one shuffle of all examples cut into ``C`` near-equal parts.
  - ``"labels"`` (McMahan et al., 2017 "pathological" split): labels are shuffled and dealt
    round-robin, ``k`` distinct labels per client; each label's examples are divided evenly
    among the clients that hold it. Every label needs a holder, so ``C * k >= num_labels``.

  **Every client gets at least one example.** After the draw, each empty client (in client order)
  takes one example from a donor: the largest client holding more than one example of one of the
  empty client's own labels (``"labels"`` mode), else the largest client. A donor always has at
  least two examples because ``num_examples >= num_clients`` is required. This moves at most
  ``C - 1`` examples, so the skew the mode asked for is barely changed, and a client that was
  empty ends with exactly one label, so ``"labels"`` mode still gives at most ``k`` labels each.

* :func:`mean_label_entropy` is the skew statistic: the mean over clients of the entropy (nats)
  of the client's label distribution (0 = one label each; ``log(num_labels)`` = uniform).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from hfedmoe.errors import DataError

__all__ = ["PartitionMode", "label_histogram", "mean_label_entropy", "partition",
           "stratified_split"]

PartitionMode = Literal["dirichlet", "iid", "labels"]


def _as_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if y.size and y.min() < 0:
        raise DataError("class ids must be >= 0")
    return y


def stratified_split(labels: Sequence[int] | np.ndarray, test_fraction: float,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split example indices into train and test, keeping class proportions.

    The test split has ``round(n * test_fraction)`` examples (at least one), apportioned over the
    classes by the largest remainder of ``n_c * test_fraction``; a class never gives up its last
    training example (so a single-example class stays in training).

    Args:
        labels: Class id of every example.
        test_fraction: Fraction of the examples held out, in ``(0, 1)``.
        seed: Seed of the shuffle inside each class.

    Returns:
        ``(train_idx, test_idx)``: disjoint sorted index arrays covering every example.

    Raises:
        DataError: Fewer than two examples, or every class has a single example.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    y = _as_labels(labels)
    if y.size < 2:
        raise DataError(f"{y.size} example(s) cannot be split into train and test")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    if counts.max() < 2:
        raise DataError("every class has a single example; no stratified test split is "
                        "possible without losing a class from training")
    n_test = _test_counts(counts, test_fraction)
    test = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, n_test,
                                                                        strict=True)]
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(y.size), test_idx)
    return train_idx, test_idx


def _test_counts(counts: np.ndarray, test_fraction: float) -> np.ndarray:
    """Per-class test sizes: largest-remainder apportionment of the total, capped at n_c - 1."""
    total = max(1, int(np.floor(counts.sum() * test_fraction + 0.5)))
    exact = counts * test_fraction
    n_test = np.minimum(np.floor(exact).astype(np.int64), counts - 1)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")  # largest remainder first
    for c in [*order, *np.argsort(-counts, kind="stable")]:
        if n_test.sum() >= total:
            break
        if n_test[c] < counts[c] - 1:
            n_test[c] += 1
    return n_test


def _dirichlet(y: np.ndarray, num_clients: int, alpha: float,
               rng: np.random.Generator) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        p = rng.dirichlet(np.full(num_clients, alpha))  # (num_clients,)
        cuts = (np.cumsum(p)[:-1] * idx.size).astype(np.int64)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].extend(chunk.tolist())
    return parts


def _iid(y: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    return [chunk.tolist() for chunk in np.array_split(rng.permutation(y.size), num_clients)]


def _by_labels(y: np.ndarray, num_clients: int, k: int,
               rng: np.random.Generator) -> tuple[list[list[int]], list[set[int]]]:
    classes = np.unique(y)
    k = min(k, classes.size)
    if num_clients * k < classes.size:
        raise DataError(f"'labels' partition: {num_clients} clients x {k} labels each cannot "
                        f"cover {classes.size} labels; raise labels_per_client or clients")
    order = rng.permutation(classes)
    assigned = [{int(order[(i * k + j) % classes.size]) for j in range(k)}
                for i in range(num_clients)]
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in classes:
        holders = [i for i in range(num_clients) if int(c) in assigned[i]]
        idx = rng.permutation(np.flatnonzero(y == c))
        for holder, chunk in zip(holders, np.array_split(idx, len(holders)), strict=True):
            parts[holder].extend(chunk.tolist())
    return parts, assigned


def _fill_empty(parts: list[list[int]], y: np.ndarray,
                assigned: list[set[int]] | None) -> None:
    """Give every empty client one example (see the module docstring); in place."""
    for i, part in enumerate(parts):
        if part:
            continue
        donor, pick = -1, -1
        if assigned is not None:
            for j, other in enumerate(parts):
                own = [t for t, e in enumerate(other) if int(y[e]) in assigned[i]]
                if len(other) > 1 and own and (donor < 0 or len(other) > len(parts[donor])):
                    donor, pick = j, own[-1]
        if donor < 0:
            donor = max(range(len(parts)), key=lambda j: len(parts[j]))
            pick = len(parts[donor]) - 1
        part.append(parts[donor].pop(pick))


def partition(labels: Sequence[int] | np.ndarray, num_clients: int,
              mode: PartitionMode = "dirichlet", *, alpha: float = 0.5,
              labels_per_client: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Partition example indices over clients (see the module docstring for the modes).

    Args:
        labels: Class id of every training example.
        num_clients: Number of clients ``C``; at most the number of examples.
        mode: ``"dirichlet"``, ``"iid"`` or ``"labels"``.
        alpha: Dirichlet concentration (``"dirichlet"`` mode), > 0.
        labels_per_client: Labels per client ``k`` (``"labels"`` mode), >= 1.
        seed: Seed; the same inputs and seed always give the same partition.

    Returns:
        One sorted index array per client. Together they hold every index exactly once and
        none is empty.

    Raises:
        DataError: Fewer examples than clients, or a ``"labels"`` split that cannot cover
            every label.
    """
    y = _as_labels(labels)
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if y.size < num_clients:
        raise DataError(f"{y.size} training examples cannot give each of {num_clients} "
                        "clients one example")
    rng = np.random.default_rng(seed)
    assigned: list[set[int]] | None = None
    if mode == "dirichlet":
        if alpha <= 0:
            raise DataError(f"alpha must be > 0, got {alpha}")
        parts = _dirichlet(y, num_clients, alpha, rng)
    elif mode == "iid":
        parts = _iid(y, num_clients, rng)
    elif mode == "labels":
        if labels_per_client < 1:
            raise DataError(f"labels_per_client must be >= 1, got {labels_per_client}")
        parts, assigned = _by_labels(y, num_clients, labels_per_client, rng)
    else:
        raise DataError(f"unknown partition mode {mode!r}; expected dirichlet, iid or labels")
    _fill_empty(parts, y, assigned)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def label_histogram(labels: Sequence[int] | np.ndarray, parts: Sequence[np.ndarray],
                    num_labels: int | None = None) -> np.ndarray:
    """Examples per (client, class): an ``int64`` array of shape ``(num_clients, num_labels)``."""
    y = _as_labels(labels)
    n = int(num_labels if num_labels is not None else (y.max() + 1 if y.size else 0))
    return np.stack([np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=n)
                     for p in parts]) if parts else np.zeros((0, n), dtype=np.int64)


def mean_label_entropy(labels: Sequence[int] | np.ndarray,
                       parts: Sequence[np.ndarray]) -> float:
    """Mean over clients of the entropy (nats) of each client's label distribution."""
    hist = label_histogram(labels, parts).astype(np.float64)  # (clients, labels)
    totals = hist.sum(axis=1, keepdims=True)
    p = np.divide(hist, totals, out=np.zeros_like(hist), where=totals > 0)
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    return float(np.mean(-(p * logs).sum(axis=1))) if len(parts) else 0.0

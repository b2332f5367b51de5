"""Riding out a store outage: retry a write with a bounded backoff, for a bounded time.

The coordinator's own writes that open and close a round (the round row, the checkpoint and
the round's result) go through :func:`until_stored`: when the store raises
:class:`hfedmoe.errors.StoreError` (a database gone away, a disk error), the write is logged
with the store's own message (which names the database, never its password) and tried again
after 0.5 s, 1 s, 2 s, ... up to ``max_s`` between tries, until it succeeds or the outage has
lasted ``limit_s`` seconds (``store.outage_limit_s``); then
:class:`hfedmoe.errors.StoreUnavailableError` says so and the server stops. ``limit_s = 0``
waits for as long as it takes.

Each write it retries must be safe to repeat: the stores' round and checkpoint writes are
upserts, so a write that committed before its answer was lost is simply written again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from hfedmoe.errors import StoreError, StoreUnavailableError

log = logging.getLogger("hfedmoe.server")
T = TypeVar("T")

FIRST_S = 0.5  # the first wait after a failed write
MAX_S = 10.0  # the longest wait between two tries


def backoff(first_s: float = FIRST_S, max_s: float = MAX_S) -> Iterator[float]:
    """The waits between tries: ``first_s``, doubling each time, never over ``max_s``."""
    delay = first_s
    while True:
        yield min(delay, max_s)
        delay = min(delay * 2, max_s)


def until_stored(what: str, write: Callable[[], T], *, limit_s: float,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 first_s: float = FIRST_S, max_s: float = MAX_S) -> T:
    """``write()``'s result, trying again while it raises StoreError.

    Args:
        what: what the write does, for the log (``"closing round 3"``).
        write: the write; safe to repeat (any error but StoreError propagates at once).
        limit_s: how long the store may keep failing before StoreUnavailableError
            (0: no limit). The last try is made when the limit is reached.
        sleep, clock: injectable for tests.
        first_s, max_s: the backoff (:func:`backoff`).

    Raises:
        StoreUnavailableError: the store still failed ``limit_s`` seconds after the first
            failure; it names ``what``, the limit and the store's last error.
    """
    started: float | None = None
    waits = backoff(first_s, max_s)
    tries = 0
    while True:
        tries += 1
        try:
            result = write()
        except StoreError as exc:
            now = clock()
            started = now if started is None else started
            out = now - started
            if limit_s and out >= limit_s:
                raise StoreUnavailableError(
                    f"{what}: the store has failed for {out:.0f}s ({tries} tries; "
                    f"store.outage_limit_s = {limit_s:g}); stopping. Start the server again "
                    f"once the store is back: it resumes from what is stored. Last error: "
                    f"{exc}") from exc
            wait = next(waits)
            if limit_s:
                wait = min(wait, limit_s - out)
            log.error("%s: the store failed (try %d, %.1fs into the outage): %s; trying "
                      "again in %.1fs", what, tries, out, exc, wait)
            sleep(wait)
            continue
        if started is not None:
            log.warning("%s: the store is back after %.1fs (%d tries)", what,
                        clock() - started, tries)
        return result


class Durable:
    """:func:`until_stored` with a server's limit: ``durable(what, write)``.

    Args:
        limit_s: ``store.outage_limit_s`` (0: no limit).
        sleep: the wait between tries (``time.sleep``; a test may replace it).
    """

    def __init__(self, limit_s: float, sleep: Callable[[float], None] = time.sleep) -> None:
        self.limit_s = limit_s
        self.sleep = sleep

    def __call__(self, what: str, write: Callable[[], T]) -> T:
        return until_stored(what, write, limit_s=self.limit_s, sleep=self.sleep)

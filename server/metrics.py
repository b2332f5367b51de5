"""The server's Prometheus endpoint (prometheus-client, optional): round, evaluation, updates.

One endpoint per run, the coordinator's (an ingest worker runs with the port at 0): the current
round, the held-out accuracy and loss of the last closed round, and updates counted by outcome
(accepted, rejected, late) whichever process took them in.
"""

from __future__ import annotations

from typing import Any


class Prometheus:
    """Optional Prometheus endpoint (prometheus-client); a no-op when the port is 0."""

    def __init__(self, port: int) -> None:
        self.enabled = port > 0
        if not self.enabled:
            return
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        reg = CollectorRegistry()  # one per server, so several can live in one process
        self.server, self.thread = start_http_server(port, registry=reg)
        self.round = Gauge("hfedmoe_round", "current round", registry=reg)
        self.accuracy = Gauge("hfedmoe_eval_accuracy", "held-out accuracy", registry=reg)
        self.loss = Gauge("hfedmoe_eval_loss", "held-out loss", registry=reg)
        self.updates = Counter("hfedmoe_updates_total", "updates by outcome", ["outcome"],
                               registry=reg)

    def close(self) -> None:
        if self.enabled:
            self.server.shutdown()

    def set_round(self, r: int) -> None:
        if self.enabled:
            self.round.set(r)

    def count(self, outcome: str) -> None:
        if self.enabled:
            self.updates.labels(outcome).inc()

    def observe(self, row: dict[str, Any]) -> None:
        if self.enabled:
            if "accuracy" in row:
                self.accuracy.set(row["accuracy"])
            if "loss" in row:
                self.loss.set(row["loss"])

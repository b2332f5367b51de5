"""``hfedmoe server``, ``report`` and ``ingest`` (the experiments that drive a server, ``demo``,
``simulate`` and ``swarm``, are :mod:`lab.cli`)."""

from __future__ import annotations

import argparse
from typing import Any

from server.ingest import register as register_ingest


def register(sub: Any) -> None:
    from hfedmoe.cli import add_config_args

    s = sub.add_parser("server", help="coordinate federated rounds over MQTT")
    add_config_args(s)
    s.set_defaults(func=run_server)

    r = sub.add_parser("report", help="write the HTML report of a run directory")
    r.add_argument("run_dir")
    r.add_argument("--config", help="the run's server config (TOML): its [store] is read "
                                    "(a PostgreSQL run); default: run.db in RUN_DIR")
    r.set_defaults(func=run_report)

    register_ingest(sub)


def build_server(cfg: Any) -> Any:
    """The coordinator for ``cfg`` with its model, held-out data (``data.eval_split``) and
    transport."""
    from hfedmoe.data import fit_task, load_task
    from hfedmoe.models.registry import build_model
    from hfedmoe.transport.mqtt import open_transport
    from server.coordinator import Coordinator

    task = load_task(cfg.data)
    model = build_model(cfg.model, cfg.data.task, task.num_labels)
    task = fit_task(task, model.require_tokenizer(), cfg.model.max_length)
    transport, broker = open_transport(cfg.transport, f"server-{cfg.run_id}")
    coordinator = Coordinator(cfg, transport, model, task.held_out)
    return coordinator, transport, broker


def run_server(args: argparse.Namespace) -> int:
    import logging

    import torch

    from hfedmoe.config import load_config, to_dict
    from server.config import ServerConfig, redact_url

    cfg = load_config(ServerConfig, args.config, args.overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    shown = to_dict(cfg)
    if shown.get("dashboard_token"):
        shown["dashboard_token"] = "***"
    shown["store"]["url"] = redact_url(cfg.store.url)
    logging.getLogger("hfedmoe.server").info("config: %s", shown)
    pool = None
    if cfg.ingest.workers and cfg.ingest.spawn:
        from server.ingest import WorkerPool

        pool = WorkerPool(cfg)
    coordinator, transport, broker = build_server(cfg)
    try:
        if pool is not None:
            pool.start()
            coordinator.on_tick = pool.check
        coordinator.run()
    finally:
        if pool is not None:
            pool.stop()
        coordinator.close()
        transport.close()
        if broker is not None:
            broker.stop()
    from server.report import write_report

    print(f"report: {write_report(cfg.run_dir, cfg)}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hfedmoe.config import load_config
    from server.config import ServerConfig
    from server.report import write_report

    cfg = load_config(ServerConfig, args.config, []) if args.config else None
    print(write_report(args.run_dir, cfg))
    csv_path = Path(args.run_dir) / "latency.csv"
    if csv_path.exists():
        print(f"per-device latency: {csv_path}")
    return 0

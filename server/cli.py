"""``hfedmoe server``, ``demo``, ``simulate`` and ``report``."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    from hfedmoe.cli import add_config_args

    s = sub.add_parser("server", help="coordinate federated rounds over MQTT")
    add_config_args(s)
    s.set_defaults(func=run_server)

    d = sub.add_parser("demo", help="one command: broker, server and emulated devices, end to end")
    d.add_argument("--broker", default="", help="use this broker (mqtt://host:port) instead of "
                                                "starting the embedded one")
    d.add_argument("--strategy", default="hfedmoe")
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--devices", type=int, default=6)
    d.add_argument("--run-dir", default="runs/demo")
    d.add_argument("--deadline", type=float, default=240.0, help="round deadline in seconds")
    d.add_argument("--dashboard-port", type=int, default=0, metavar="PORT",
                   help="serve the live dashboard on http://127.0.0.1:PORT/ (e.g. 8765; "
                        "0: off)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a server config value, e.g. train.lr=1e-3")
    d.set_defaults(func=run_demo)

    m = sub.add_parser("simulate", help="in-process federated simulation for experiments")
    add_config_args(m)
    m.add_argument("--devices", type=int, default=10)
    m.add_argument("--profiles", default="", help="comma-separated profile names or a file with "
                                                  "one per line (default: the shipped ones)")
    m.add_argument("--run-dir", default="")
    m.add_argument("--backend", choices=("sequential", "ray"), default="sequential",
                   help="train the devices one after another in this process (sequential) or "
                        "in parallel on Ray actors (ray; pip install \"hfedmoe[ray]\"): "
                        "the same metrics for the same seed, timings aside")
    m.add_argument("--ray-address", default="", help="join this Ray cluster (default: start a "
                                                     "local Ray)")
    m.add_argument("--ray-workers", type=int, default=0, metavar="N",
                   help="Ray actors training devices (default: one per CPU, with train.threads "
                        "torch threads each, at most the participants of a round)")
    m.set_defaults(func=run_simulate)

    r = sub.add_parser("report", help="write the HTML report of a run directory")
    r.add_argument("run_dir")
    r.set_defaults(func=run_report)


def build_server(cfg: Any) -> Any:
    """The coordinator for ``cfg`` with its model, held-out data and transport."""
    from hfedmoe.data import load_task
    from hfedmoe.models.registry import build_model
    from hfedmoe.transport.mqtt import open_transport
    from server.coordinator import Coordinator

    task = load_task(cfg.data)
    model = build_model(cfg.model, cfg.data.task, task.num_labels)
    transport, broker = open_transport(cfg.transport, f"server-{cfg.run_id}")
    coordinator = Coordinator(cfg, transport, model, task.test)
    return coordinator, transport, broker


def run_server(args: argparse.Namespace) -> int:
    import logging

    import torch

    from hfedmoe.config import load_config, to_dict
    from server.config import ServerConfig

    cfg = load_config(ServerConfig, args.config, args.overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    shown = to_dict(cfg)
    if shown.get("dashboard_token"):
        shown["dashboard_token"] = "***"
    logging.getLogger("hfedmoe.server").info("config: %s", shown)
    pool = None
    if cfg.ingest.workers:
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

    print(f"report: {write_report(cfg.run_dir)}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from server.launch import demo

    return demo(args)


def run_simulate(args: argparse.Namespace) -> int:
    from server.launch import simulate

    return simulate(args)


def run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from server.report import write_report

    print(write_report(args.run_dir))
    csv_path = Path(args.run_dir) / "latency.csv"
    if csv_path.exists():
        print(f"per-device latency: {csv_path}")
    return 0

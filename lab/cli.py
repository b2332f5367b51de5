"""``hfedmoe demo``, ``simulate`` and ``swarm``: the experiments that drive a server and its
devices (one host, in-process or as processes)."""

from __future__ import annotations

import argparse
from typing import Any

from hfedmoe.cli import add_config_args
from lab.swarm import register as register_swarm


def register(sub: Any) -> None:
    d = sub.add_parser("demo", help="one command: broker, server and emulated devices, end to end")
    d.add_argument("--broker", default="", help="use this broker (mqtt://host:port) instead of "
                                                "starting the embedded one")
    d.add_argument("--strategy", default="hfedmoe")
    d.add_argument("--task", choices=("classification", "causal-lm"), default="classification",
                   help="classification: MiniLM-MoE topic classification (accuracy); causal-lm: "
                        "a tiny Qwen2-MoE fine-tuned with LoRA on the bundled prompt/response "
                        "pairs (loss, perplexity, ROUGE-L)")
    d.add_argument("--secure-aggregation", action="store_true",
                   help="aggregate through expert-level secure aggregation ([secagg], "
                        "docs/security.md): the server learns only sums")
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--devices", type=int, default=6)
    d.add_argument("--run-dir", default="runs/demo")
    d.add_argument("--deadline", type=float, default=900.0,
                   help="round deadline in seconds (it bounds the devices' 15-minute emulated "
                        "training window; a round closes once every update is in)")
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

    register_swarm(sub)


def run_demo(args: argparse.Namespace) -> int:
    from lab.launch import demo

    return demo(args)


def run_simulate(args: argparse.Namespace) -> int:
    from lab.launch import simulate

    return simulate(args)

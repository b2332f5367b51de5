"""The ``hfedmoe`` command: one CLI, one subcommand per workflow.

Subcommand modules are imported only to build the parser; each keeps heavy imports (torch,
executorch, paho) inside its handler so ``hfedmoe --help`` stays fast. Errors of the kit's
exception tree become a one-line message and the error's exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from hfedmoe.errors import HFedMoEError

# name -> module providing ``register(subparsers)``; later workflows add themselves here.
COMMANDS: dict[str, str] = {
    "models": "hfedmoe.models.cli",
    "certs": "hfedmoe.transport.cli",
    "profile": "device_agent.cli",
    "agent": "device_agent.cli",
    "server": "server.cli",
    "demo": "server.cli",
    "simulate": "server.cli",
    "report": "server.cli",
    "export": "export.cli",
}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The ``--config file.toml`` and repeated ``--set a.b=value`` options every workflow takes."""
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value, e.g. method.beta=0.2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfedmoe", description="HFedMoE edge kit: resource-aware federated fine-tuning of "
                                    "Mixture-of-Experts models on phones, Jetson boards and laptops")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in dict.fromkeys(COMMANDS.values()):  # a module may provide several commands
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except HFedMoEError as exc:
        print(f"hfedmoe {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

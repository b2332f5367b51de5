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
from pathlib import Path
from types import ModuleType

from hfedmoe.errors import ConfigError, HFedMoEError

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
    "swarm": "server.swarm",
    "ingest": "server.ingest",
    "export": "export.cli",
    "bench": "benchmarks.cli",
}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The ``--config file.toml`` and repeated ``--set a.b=value`` options every workflow takes."""
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value, e.g. method.beta=0.2")


def _import_command(module: str) -> ModuleType | None:
    """Import a command module; a top-level package that lives only in a source checkout
    (``benchmarks``) is looked for next to ``hfedmoe/``. None if it is not there either."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".")[0]
        if exc.name != top:
            raise
        root = Path(__file__).resolve().parent.parent
        if not (root / top / "__init__.py").is_file():
            return None
        sys.path.insert(0, str(root))
        return importlib.import_module(module)


def _unavailable(sub: argparse._SubParsersAction, name: str, module: str) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise ConfigError(f"'{name}' needs {module.split('.')[0]}/ from the source checkout, "
                          "which this installation does not have; run from a clone")

    p = sub.add_parser(name, help=f"(unavailable: needs {module.split('.')[0]}/ of a checkout)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=fail)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfedmoe", description="HFedMoE edge kit: resource-aware federated fine-tuning of "
                                    "Mixture-of-Experts models on phones, Jetson boards and laptops")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in dict.fromkeys(COMMANDS.values()):  # a module may provide several commands
        mod = _import_command(module)
        if mod is not None:
            mod.register(sub)
        else:
            for name in (n for n, m in COMMANDS.items() if m == module):
                _unavailable(sub, name, module)
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

"""The ``hfedmoe`` command: a dispatcher over the ``hfedmoe.commands`` entry-point group.

Each package of the kit registers its subcommands into that group (``pyproject.toml``:
``[project.entry-points."hfedmoe.commands"]``, value ``module:register``); the core names no
upper package. A registering module keeps heavy imports (torch, executorch, paho) inside its
handlers so ``hfedmoe --help`` stays fast. A group entry whose module cannot be imported (an
extra that is not installed) is listed as unavailable with the reason. Errors of the kit's
exception tree become a one-line message and the error's exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points

from hfedmoe.errors import ConfigError, HFedMoEError

GROUP = "hfedmoe.commands"


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The ``--config file.toml`` and repeated ``--set a.b=value`` options every workflow takes."""
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value, e.g. method.beta=0.2")


def command_entry_points() -> list[EntryPoint]:
    """The registered command groups, in name order (one entry may add several commands)."""
    return sorted(entry_points(group=GROUP), key=lambda ep: ep.name)


def _unavailable(sub: argparse._SubParsersAction, ep: EntryPoint, exc: ImportError) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise ConfigError(f"the '{ep.name}' commands need {ep.module}, which cannot be "
                          f"imported here ({exc}); install the kit's extra that provides it")

    p = sub.add_parser(ep.name, help=f"(unavailable: {exc})")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=fail)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfedmoe", description="HFedMoE edge kit: resource-aware federated fine-tuning of "
                                    "Mixture-of-Experts models on phones, Jetson boards and laptops")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    eps = command_entry_points()
    if not eps:
        raise ConfigError(f"no commands are registered in the {GROUP!r} entry-point group: "
                          "install the kit (pip install -e .) so its metadata is present")
    for ep in eps:
        try:
            register: Callable[[argparse._SubParsersAction], None] = ep.load()
        except ImportError as exc:
            _unavailable(sub, ep, exc)
            continue
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except HFedMoEError as exc:
        print(f"hfedmoe: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code
    args = parser.parse_args(argv)
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

"""``hfedmoe bench NAME [args...]``: run one benchmark of ``benchmarks/`` by name.

``hfedmoe bench --list`` names the benchmarks with the first line of each docstring (read
without importing the module). Results go to ``benchmarks/results/`` of the working directory
unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
from pathlib import Path
from types import ModuleType

NOT_BENCHMARKS = {"cli", "__init__"}


def find_package() -> ModuleType:
    """The installed ``benchmarks`` package."""
    return importlib.import_module("benchmarks")


def available() -> dict[str, str]:
    """Benchmark name -> first docstring line, for every ``benchmarks/NAME.py``."""
    pkg = find_package()
    out = {}
    for directory in pkg.__path__:
        for path in sorted(Path(directory).glob("*.py")):
            name = path.stem
            if name in NOT_BENCHMARKS or name.startswith("_"):
                continue
            try:
                doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            except SyntaxError:
                doc = ""
            out[name] = doc.strip().splitlines()[0] if doc.strip() else ""
    return out


def run(args: argparse.Namespace) -> int:
    from hfedmoe.errors import ConfigError

    names = available()
    if args.list or not args.name:
        width = max((len(n) for n in names), default=0)
        for name, doc in names.items():
            print(f"{name:<{width}}  {doc}")
        return 0
    if args.name not in names:
        raise ConfigError(f"unknown benchmark {args.name!r}; available: {', '.join(names)}")
    module = importlib.import_module(f"benchmarks.{args.name}")
    # argparse's prog, and the command a row records (benchmarks._common.command_line)
    saved, sys.argv = sys.argv, [f"hfedmoe bench {args.name}", *args.rest]
    try:
        return int(module.main(list(args.rest)) or 0)
    finally:
        sys.argv = saved


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (hfedmoe bench --list)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("name", nargs="?", help="benchmark name (see --list)")
    p.add_argument("rest", nargs=argparse.REMAINDER,
                   help="arguments for the benchmark (e.g. --quick --out r.jsonl)")
    p.set_defaults(func=run)

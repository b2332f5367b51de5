"""``hfedmoe models``: list the supported model families; ``models inspect NAME_OR_PATH``."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list supported MoE models; 'inspect NAME' shows one")
    msub = p.add_subparsers(dest="models_command")
    ins = msub.add_parser("inspect", help="layers, experts, top-k, parameters of a model")
    ins.add_argument("name", help="registered name (see 'hfedmoe models') or local checkpoint dir")
    ins.add_argument("--task", default="classification", choices=["classification", "causal-lm"])
    ins.add_argument("--num-labels", type=int, default=0)
    ins.add_argument("--experts", type=int, default=None, help="experts per layer (upcycling)")
    ins.add_argument("--top-k", type=int, default=None)
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from hfedmoe.models.registry import model_names

    console = Console()
    if getattr(args, "models_command", None) != "inspect":
        table = Table(title="Supported models")
        table.add_column("name")
        table.add_column("what it is")
        for name, desc in model_names().items():
            table.add_row(name, desc)
        console.print(table)
        console.print("Any local checkpoint directory of these families also works "
                      "(qwen2_moe, qwen3_moe, olmoe, mixtral, deepseek_v3, switch_transformers).")
        return 0

    import dataclasses

    from hfedmoe.config import ModelConfig
    from hfedmoe.models.registry import build_model

    cfg = ModelConfig(name=args.name)
    changes = {k: v for k, v in {"num_experts": args.experts, "top_k": args.top_k}.items()
               if v is not None}
    cfg = dataclasses.replace(cfg, **changes)
    model = build_model(cfg, task=args.task, num_labels=args.num_labels or None)
    info = model.summary()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    table = Table(title=f"{args.name} ({info['family']}, {info['task']})", show_header=False)
    for key, value in info.items():
        if isinstance(value, list) and len(set(map(str, value))) == 1:
            value = f"{value[0]} (all {len(value)} layers)"
        elif isinstance(value, int) and key.endswith(("params", "per_token")):
            value = f"{value:,} ({value / 1e6:.2f} M)"
        table.add_row(key, str(value))
    console.print(table)
    return 0

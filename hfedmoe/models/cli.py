"""``hfedmoe models``: list the supported model families; ``models inspect NAME_OR_PATH``."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list supported MoE models; 'inspect NAME' shows one")
    msub = p.add_subparsers(dest="models_command")
    ins = msub.add_parser("inspect", help="layers, experts, top-k, parameters of a model")
    ins.add_argument("name", help="registered name (see 'hfedmoe models') or local checkpoint dir")
    ins.add_argument("--task", default="classification",
                     choices=["classification", "causal-lm", "seq2seq"])
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
        from hfedmoe.models.registry import family_paths

        paths = family_paths()
        hand = sorted(t for t, p in paths.items() if p == "hand")
        generic = sorted(t for t, p in paths.items() if p == "interface")
        console.print("A local checkpoint directory (config.json + weights) of these model types "
                      f"also works.\nhand adapters: {', '.join(hand)}\n"
                      f"generic interface adapter ({len(generic)}, transformers' "
                      f"use_experts_implementation): {', '.join(generic)}")
        return 0

    import dataclasses

    from hfedmoe.config import ModelConfig
    from hfedmoe.models.plan import is_config_only
    from hfedmoe.models.registry import build_model

    if is_config_only(args.name):  # no weights: plan the real size on the meta device
        return _inspect_plan(args, console)
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


def _inspect_plan(args: argparse.Namespace, console: object) -> int:
    """``models inspect DIR`` for a directory holding only ``config.json``."""
    from rich.table import Table

    from hfedmoe.models.plan import plan_dir

    task = "causal-lm" if args.task == "classification" and not args.num_labels else args.task
    info = plan_dir(args.name, task, args.num_labels or 2)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    table = Table(title=f"{args.name} ({info['family']}, {info['task']}; config only: "
                        "planned on the meta device, no weights)", show_header=False)
    for key, value in info.items():
        if key == "weight_bytes":
            for dtype, n in value.items():
                table.add_row(f"weights {dtype}", f"{n / 2**30:.2f} GiB")
            continue
        if isinstance(value, list) and len(set(map(str, value))) == 1:
            value = f"{value[0]} (all {len(value)} MoE layers)"
        elif isinstance(value, int) and key.endswith(("params", "per_token", "per_expert")):
            value = f"{value:,} ({value / 1e9:.3f} B)" if value >= 1e8 else \
                f"{value:,} ({value / 1e6:.2f} M)"
        table.add_row(key, str(value))
    console.print(table)  # type: ignore[attr-defined]
    console.print("int8 / int4: what model.quantize stores (expert and other frozen linear "  # type: ignore[attr-defined]
                  "weights quantized, the rest fp32)")
    return 0

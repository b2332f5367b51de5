"""``hfedmoe profile``: measure this device (or load an emulated profile), print it, save JSON.

Examples::

    hfedmoe profile                                  # live probes + 1 s matmul per dtype
    hfedmoe profile --matmul-seconds 3 --out me.json
    hfedmoe profile --emulate jetson-orin-nano-8gb   # a shipped profile
    hfedmoe profile --emulate ./my-phone.toml
    hfedmoe profile --list-profiles
    hfedmoe profile --model examples/models/olmoe-1b-7b-0924 --emulate jetson-agx-orin-32gb
        # every training mode's budget for a 10-minute window of 10 steps (--window, --steps)
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from device_agent.budget import DEFAULT_MEMORY_MARGIN

if TYPE_CHECKING:
    from device_agent.report import DeviceReport


def register(sub: Any) -> None:
    """Add the ``profile`` subcommand to the ``hfedmoe`` parser."""
    p = sub.add_parser("profile", help="measure this device (or emulate one) and save a report",
                       description=__doc__.splitlines()[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="device-report.json",
                   help="where to save the JSON report (default: %(default)s; '-' to skip)")
    p.add_argument("--emulate", metavar="NAME_OR_PATH",
                   help="load a device profile instead of measuring (see --list-profiles)")
    p.add_argument("--matmul-seconds", type=float, default=1.0, metavar="S",
                   help="timed window per dtype for the matmul benchmark; 0 skips it")
    p.add_argument("--matmul-size", type=int, default=None, metavar="N",
                   help="matrix size (default 1024 on CPU, 4096 on CUDA)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--list-profiles", action="store_true", help="list shipped profiles and exit")
    p.add_argument("--model", default="minilm-moe",
                   help="time one expert and the non-expert step of this model ('none': skip); "
                        "a directory with only config.json is planned: one expert of its real "
                        "shape timed, the rest counted, a budget per mode")
    p.add_argument("--batch", type=int, default=8, help="batch size of the model timing")
    p.add_argument("--seq", type=int, default=128, help="sequence length of the model timing")
    p.add_argument("--window", type=float, default=10.0, metavar="MIN",
                   help="the round's training window in minutes (the server's "
                        "rounds.train_time_s), default %(default)s")
    p.add_argument("--steps", type=int, default=10,
                   help="local steps per round (the server's train.max_steps), default "
                        "%(default)s")
    p.add_argument("--margin", type=float, default=DEFAULT_MEMORY_MARGIN, metavar="FRACTION",
                   help="share of the memory kept free (agent.memory_margin), default "
                        "%(default)s")
    p.set_defaults(func=run)

    a = sub.add_parser("agent", help="run a device agent: register, train rounds, send updates")
    from hfedmoe.cli import add_config_args

    add_config_args(a)
    a.set_defaults(func=run_agent)


def run_agent(args: argparse.Namespace) -> int:
    """Handler of ``hfedmoe agent``."""
    from device_agent.agent import DeviceAgent
    from device_agent.config import load_agent_config

    cfg = load_agent_config(args.config, args.overrides)
    return DeviceAgent(cfg).run()


def _check_plan_args(args: argparse.Namespace) -> None:
    from hfedmoe.errors import ConfigError

    if not args.window > 0:
        raise ConfigError(f"--window must be > 0 minutes, got {args.window}")
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if not 0 <= args.margin < 1:
        raise ConfigError(f"--margin must be in [0, 1), got {args.margin}")


def model_costs(report: DeviceReport, args: argparse.Namespace) -> dict[str, Any]:
    """The budget of every training mode of ``--model`` in a ``--window``-minute round of
    ``--steps`` steps: planned from the profile's rates on an emulated device
    (:func:`device_agent.plan.plan_costs`); on this device, a config-only directory has one
    real-shape expert timed here, a built model its step costs measured.

    Raises:
        ConfigError: for a window, step count or margin that make no sense, and for a window
            shorter than one step in every mode.
    """
    import dataclasses

    from device_agent.costs import decide_budget, measure_costs
    from device_agent.plan import check_window, plan_costs
    from hfedmoe.config import ModelConfig
    from hfedmoe.models.plan import build_meta_model, is_config_only
    from hfedmoe.models.registry import build_model

    _check_plan_args(args)
    window = args.window * 60.0
    config_only = is_config_only(args.model)
    if config_only or report.emulated:  # planned per mode
        model = (build_meta_model(args.model) if config_only
                 else build_model(ModelConfig(name=args.model), "classification", 4))
        costs = plan_costs(model, report, args.batch, args.seq, window, args.steps,
                           margin=args.margin)
        check_window(costs)
        return costs
    model = build_model(ModelConfig(name=args.model), "classification", 4)
    out: dict[str, Any] = {"model": args.model, "batch": args.batch, "seq": args.seq,
                           "window_s": window, "steps": args.steps}
    for adapter in ("full", "lora"):  # train.adapter: whole experts, or LoRA factors
        measured = measure_costs(model, args.batch, args.seq, adapter=adapter)
        budget = decide_budget(report, measured.cost, window, args.steps,
                               margin_fraction=args.margin)
        out[adapter] = {"tokens_per_expert": measured.tokens_per_expert,
                        "lora_rank": measured.lora_rank,
                        "steps": dataclasses.asdict(measured.steps), "budget": budget.to_dict()}
    return out


def print_costs(costs: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    if costs.get("planned"):  # a config-only directory (device_agent.plan)
        from device_agent.plan import print_plan_costs

        print_plan_costs(costs)
        return
    full, lora = costs["full"], costs["lora"]
    table = Table(title=f"{costs['model']}: a {costs['window_s'] / 60:g}-minute window of "
                        f"{costs['steps']} local steps, batch {costs['batch']} x seq "
                        f"{costs['seq']} ({full['tokens_per_expert']} tokens per expert)")
    table.add_column("")
    table.add_column("train.adapter = full")
    table.add_column(f"train.adapter = lora (rank {lora['lora_rank']})")

    def row(label: str, fn: Any) -> None:
        table.add_row(label, fn(full), fn(lora))

    row("one expert fwd+bwd (trained)", lambda c: f"{c['steps']['expert_seconds'] * 1e3:.2f} ms, "
        f"peak {c['steps']['expert_peak_bytes'] / 2**20:.1f} MiB")
    row("one expert frozen", lambda c: f"{(c['steps']['expert_frozen_seconds'] or 0) * 1e3:.2f} ms")
    row("non-expert fwd+bwd", lambda c: f"{c['steps']['rest_seconds'] * 1e3:.1f} ms, peak "
        f"{c['steps']['rest_peak_bytes'] / 2**20:.1f} MiB")
    row("memory per trained expert", lambda c: f"{_per_expert_mib(c['budget']['cost']):.1f} MiB")
    row("trainer's fixed part (calibrated)",
        lambda c: f"{c['budget']['cost'].get('trainer_fixed_bytes', 0) / 2**20:.1f} MiB")
    row("C_budget", lambda c: f"{c['budget']['c_budget']} of "
        f"{c['budget']['cost']['num_experts']} experts ({c['budget']['limit']}: "
        f"{c['budget']['reason']})")
    row("predicted step / peak", lambda c: f"{c['budget']['step_seconds']:.3f} s / "
        f"{c['budget']['peak_bytes'] / 2**30:.2f} GiB")
    if full["budget"].get("host_memory_max") is not None:
        row("memory pools: gpu / host", _pools)
    Console().print(table)


def _pools(c: dict[str, Any]) -> str:
    """A discrete GPU's two pools: the experts each allows, and the predicted peaks."""
    b = c["budget"]
    return (f"{b['gpu_memory_max']} / {b['host_memory_max']} experts, peak "
            f"{b['peak_bytes'] / 2**30:.2f} / {b['host_peak_bytes'] / 2**30:.2f} GiB")


def _per_expert_mib(cost: dict[str, Any]) -> float:
    from device_agent.budget import CostModel

    return CostModel(**cost).per_trained_expert_bytes / 2**20


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024**3:.2f} GiB"


def report_rows(report: DeviceReport) -> list[tuple[str, str]]:
    """The report as (field, value) rows for display."""
    src = f"emulated: {report.source}" if report.emulated else "live measurement"
    rows = [
        ("source", src), ("platform", report.platform), ("board", report.board or "-"),
        ("cpu", report.cpu_model or "-"),
        ("cores (logical/physical)", f"{report.logical_cores or '-'}/{report.physical_cores or '-'}"),
        ("torch threads", str(report.torch_threads or "-")),
        ("cpu capability", report.cpu_capability or "-"),
        ("memory total", _gib(report.memory_total_bytes)),
        ("memory available", _gib(report.memory_available_bytes)),
        ("accelerator", report.accelerator),
    ]
    if report.gpu_name or report.gpu_memory_total_bytes:
        rows += [("gpu", report.gpu_name or "-"),
                 ("gpu memory free/total", f"{_gib(report.gpu_memory_free_bytes)} / "
                                           f"{_gib(report.gpu_memory_total_bytes)}")]
    rows += [("unified memory", "yes" if report.unified_memory else "no")]
    if report.discrete_gpu:  # two pools: the GPU's own memory and the host's
        rows += [("budget memory: gpu pool", _gib(report.budget_memory_bytes)),
                 ("budget memory: host pool", _gib(report.host_memory_bytes))]
    else:
        rows.append(("budget memory", _gib(report.budget_memory_bytes)))
    optional = [("power mode", report.power_mode),
                ("battery", None if report.battery_percent is None else
                 f"{report.battery_percent:.0f} % (plugged: {report.battery_plugged})"),
                ("temperature", None if report.temperature_c is None else
                 f"{report.temperature_c:.1f} C"),
                ("cpu clock / max", None if report.cpufreq_ratio is None else
                 f"{report.cpufreq_ratio:.0%}"),
                ("throttled", None if report.throttled is None else str(report.throttled))]
    rows += [(k, v) for k, v in optional if v is not None]
    for dtype, m in sorted(report.matmul.items()):
        how = (f"n={m.n}, {m.iterations} iters in {m.seconds:.2f} s" if m.iterations
               else "sustained, planning figure")
        rows.append((f"matmul {dtype}", f"{m.gflops:.1f} GFLOP/s ({how})"))
    rows += _profile_rows(report)
    rows += [("note", n) for n in report.notes]
    missing = [k for k, v in report.probes.items() if not v.get("ok")]
    if missing:
        rows.append(("unavailable probes", ", ".join(missing)))
    return rows


def _profile_rows(report: DeviceReport) -> list[tuple[str, str]]:
    """What a profile adds: bandwidth, the per-app limit, peak rates, sources, the scale."""
    rows = []
    if report.memory_bandwidth_gbps:
        rows.append(("memory bandwidth", f"{report.memory_bandwidth_gbps:g} GB/s"))
    if report.app_memory_limit_bytes is not None:
        rows.append(("per-app memory limit", _gib(report.app_memory_limit_bytes)))
    for proc, rates in sorted(report.peak_gflops.items()):
        rows.append((f"peak {proc}", ", ".join(f"{d} {r:g} GFLOP/s"
                                                for d, r in sorted(rates.items()))))
    if report.speed_factor is not None:
        rows.append(("speed factor", f"{report.speed_factor:g}"))
    rows += [(f"source: {k.replace('_', ' ')}", v) for k, v in sorted(report.sources.items())]
    if report.emulation:
        from device_agent.emulation import EmulationScale

        rows.append(("emulation scale", EmulationScale.from_dict(report.emulation).describe()))
    return rows


def print_report(report: DeviceReport) -> None:
    """Print the report as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="HFedMoE device report", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in report_rows(report):
        table.add_row(key, value)
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    """Handler of ``hfedmoe profile``."""
    from device_agent.profiles import list_profiles, load_profile

    if args.list_profiles:
        for name in list_profiles():
            print(name)
        return 0
    if args.emulate:
        report = load_profile(args.emulate)
    else:
        from device_agent.resources import probe_device

        report = probe_device(device=args.device, matmul_seconds=args.matmul_seconds,
                              matmul_n=args.matmul_size)
    print_report(report)
    costs = None
    if args.model and args.model != "none":
        costs = model_costs(report, args)
        print_costs(costs)
    if args.out and args.out != "-":
        path = report.save(args.out)
        print(f"saved {path}")
        if costs is not None:
            import json
            from pathlib import Path

            cpath = Path(args.out).with_suffix(".costs.json")
            cpath.write_text(json.dumps(costs, indent=2, default=str) + "\n")
            print(f"saved {cpath}")
    return 0

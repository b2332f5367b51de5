"""``hfedmoe profile``: measure this device (or load an emulated profile), print it, save JSON.

Examples::

    hfedmoe profile                                  # live probes + 1 s matmul per dtype
    hfedmoe profile --matmul-seconds 3 --out me.json
    hfedmoe profile --emulate jetson-orin-nano-8gb   # a shipped profile
    hfedmoe profile --emulate ./my-phone.toml
    hfedmoe profile --list-profiles
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

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
    p.set_defaults(func=run)


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
    rows += [("unified memory", "yes" if report.unified_memory else "no"),
             ("budget memory", _gib(report.budget_memory_bytes))]
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
        how = f"n={m.n}, {m.iterations} iters in {m.seconds:.2f} s" if m.iterations else "estimate"
        rows.append((f"matmul {dtype}", f"{m.gflops:.1f} GFLOP/s ({how})"))
    if report.speed_factor is not None:
        rows.append(("speed factor", f"{report.speed_factor:g}"))
    rows += [("note", n) for n in report.notes]
    missing = [k for k, v in report.probes.items() if not v.get("ok")]
    if missing:
        rows.append(("unavailable probes", ", ".join(missing)))
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
    if args.out and args.out != "-":
        print(f"saved {report.save(args.out)}")
    return 0

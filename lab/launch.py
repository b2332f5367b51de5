"""``hfedmoe demo``: a broker, the server and emulated devices as separate processes, end to end.

Each device runs ``hfedmoe agent`` in its own process with its own config file, emulating a
shipped device profile (phone, Jetson, Raspberry Pi, laptop), so budgets differ; everything is
stated as emulated in the output. The demo's small model stands in for a real one: every
profile's memory, bandwidth and rates are scaled by the demo model's parameters over
OLMoE-1B-7B's (:data:`DEMO_REFERENCE`, ``device_agent.emulation``), so its budgets bind and
differ as a real model's would, and are the same in every run. The demo prints that scale and
the budgets, and ends with a summary and the path of the HTML report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from server.rounds import INITIAL, round_label

DEMO_PROFILES = ("phone-midrange-6gb", "jetson-orin-nano-8gb", "phone-flagship-12gb",
                 "raspberry-pi-5-8gb", "laptop-cpu-16gb", "jetson-agx-orin-32gb",
                 "phone-midrange-6gb", "jetson-orin-nano-8gb")

# The model the demo's small model stands in for: the profiles are scaled by the demo model's
# parameters over this one's (device_agent.emulation.REFERENCE_MODELS).
DEMO_REFERENCE = "olmoe-1b-7b-0924"
DEMO_WINDOW_S = 900.0  # a 15-minute training window, in each device's own (emulated) time

# Demo defaults: short questions; the learning rates are the kit's (chosen by
# benchmarks/lr_sweep.py: 1e-3 for experts and gates, 3e-2 for the fresh head).
DEMO_SERVER = {
    "model": {"max_length": 64},
    "train": {"batch_size": 8, "local_epochs": 1, "threads": 1},
    # Devices budget their experts for a 15-minute window of their own (emulated) time, in
    # which every one fits its local steps: their scaled memory sets the budgets.
    "rounds": {"registration_timeout_s": 300.0, "train_time_s": DEMO_WINDOW_S},
    # bf16 deltas on the wire: half the upload of fp32 (decoded back to fp32 on the server)
    "wire": {"dtype": "bfloat16"},
}


# ``--task causal-lm``: the bundled prompt/response pairs (non-IID by topic), loss on the
# responses, HFedMoE with LoRA on the experts, the shared experts and the attention of a frozen
# tiny Qwen2-MoE (offline byte-level tokenizer); held-out loss, perplexity and ROUGE-L
DEMO_CAUSAL_LM = {
    "max_eval_examples": 128, "eval_generate_examples": 32, "eval_max_new_tokens": 32,
    "model": {"name": "qwen2-moe-tiny", "max_length": 160, "lora_targets": ["attention"]},
    "data": {"task": "causal-lm"},
    "train": {"adapter": "lora", "lr": 1e-2, "max_steps": 8},
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = open(log_path, "w")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen([sys.executable, "-m", "hfedmoe.cli", *args], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def write_configs(run_dir: Path, broker_url: str, args: argparse.Namespace,
                  run_id: str) -> tuple[Path, list[Path]]:
    """The server's and every device's TOML config, written into the run directory."""
    from hfedmoe.config import apply_overrides

    causal = getattr(args, "task", "") == "causal-lm"
    base = _merge(DEMO_SERVER, DEMO_CAUSAL_LM) if causal else DEMO_SERVER
    server = _merge(base, {
        "run_id": run_id, "run_dir": str(run_dir), "transport": {"url": broker_url},
        "method": {"strategy": args.strategy},
        "rounds": {"rounds": args.rounds, "deadline_s": args.deadline,
                   "min_devices": args.devices,
                   # the window is emulated time; the deadline bounds it (a round still closes
                   # as soon as every update is in)
                   "train_time_s": min(DEMO_WINDOW_S, args.deadline)}})
    if getattr(args, "secure_aggregation", False):
        server["secagg"] = {"enabled": True}
    if getattr(args, "dashboard_port", 0):
        server["dashboard_port"] = args.dashboard_port  # on loopback: no token needed
    server = apply_overrides(server, args.overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    server_path = run_dir / "server.toml"
    server_path.write_text(tomli_w.dumps(server))
    agents = []
    for i in range(args.devices):
        profile = DEMO_PROFILES[i % len(DEMO_PROFILES)]
        device = f"dev{i}-{profile.split('-')[0]}"
        agent = {"device_id": device, "run_id": run_id, "emulate": profile,
                 # the tiny causal LM (0.1 M parameters) is no stand-in for a real model's
                 # memory: its devices plan it at its own size
                 "emulate_reference": "" if causal else DEMO_REFERENCE,
                 "work_dir": str(run_dir / "agents" / device), "shard": i,
                 "num_shards": args.devices, "upload_margin_s": 10.0,
                 # the devices share this host: they time it one at a time
                 "measure_lock": str(run_dir / "agents" / "measure.lock"),
                 "model": server.get("model", {}), "data": server.get("data", {}),
                 "train": {"threads": 1, "batch_size": server["train"]["batch_size"]},
                 "transport": {"url": broker_url}, "wire": server.get("wire", {})}
        path = run_dir / "agents" / f"{device}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps(agent))
        agents.append(path)
    return server_path, agents


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=150)
    run_dir = Path(args.run_dir)
    if (run_dir / "run.db").exists():
        import shutil

        shutil.rmtree(run_dir)  # a demo always starts fresh
    broker, url = _broker(args, console)
    server_cfg, agent_cfgs = write_configs(run_dir, url, args, f"demo-{int(time.time())}")
    console.print(f"run directory {run_dir}; server config {server_cfg}")
    procs: list[subprocess.Popen] = []
    start = time.time()
    try:
        procs = _start(args, console, run_dir, server_cfg, agent_cfgs)
        code = _follow(procs[0], console, run_dir, args.rounds, start)
    finally:
        _stop(procs)
        if broker is not None:
            broker.stop()
    if code != 0:
        console.print(f"[red]server exited with {code}; see {run_dir / 'server.log'}[/red]")
        return 1
    _summary(console, Table, run_dir, time.time() - start)
    return 0


def _broker(args: argparse.Namespace, console: Any) -> tuple[Any, str]:
    """The broker to use: ``--broker``, else an embedded one (returned, to stop at the end)."""
    from hfedmoe.transport.broker import EmbeddedBroker

    if args.broker:
        return None, args.broker
    broker = EmbeddedBroker().start()
    console.print(f"embedded MQTT broker (amqtt) on {broker.url}")
    return broker, broker.url


def _start(args: argparse.Namespace, console: Any, run_dir: Path, server_cfg: Path,
           agent_cfgs: list[Path]) -> list[subprocess.Popen]:
    """The server and every device agent, each in its own process; the server first."""
    procs = [_spawn(["server", "--config", str(server_cfg)], run_dir / "server.log")]
    if getattr(args, "dashboard_port", 0):
        console.print(f"dashboard: http://127.0.0.1:{args.dashboard_port}/", markup=False)
    for path in agent_cfgs:
        procs.append(_spawn(["agent", "--config", str(path)], path.with_suffix(".log")))
    console.print(f"{len(agent_cfgs)} device agents started (budgets come from emulated "
                  f"device profiles: {', '.join(DEMO_PROFILES[:len(agent_cfgs)])}; each "
                  f"profile's memory, bandwidth and rates scaled to the demo model's size over "
                  f"{DEMO_REFERENCE}'s)")
    return procs


def _follow(server: subprocess.Popen, console: Any, run_dir: Path, rounds: int,
            start: float) -> int | None:
    """Print each metrics row as the server writes it, until the server exits (or an hour
    has passed); the server's exit code."""
    seen = 0
    while server.poll() is None:
        time.sleep(1.0)
        rows = _rows(run_dir)
        for r in rows[seen:]:
            console.print(f"[{time.time() - start:6.1f}s] {_progress(r, rounds)}")
        seen = len(rows)
        if time.time() - start > 3600:
            console.print("[red]demo did not finish within an hour; stopping[/red]")
            break
    return server.wait(timeout=60) if server.poll() is None else server.returncode


def _progress(row: dict[str, Any], rounds: int) -> str:
    """One console line for a metrics row: 'initial: accuracy ...' or 'round 2/3: ...'
    (rounds numbered as the dashboard and the report number them)."""
    label = round_label(row)
    initial = label == INITIAL
    what = label if initial else f"round {label}/{rounds}"
    acc = f"accuracy {row['accuracy']:.3f}" if "accuracy" in row else \
        f"loss {row.get('loss', float('nan')):.3f}"
    if "rougeL" in row:
        acc += f", ROUGE-L {row['rougeL']:.3f}"
    extra = "" if initial else (
        f", {row['accepted']}/{row['participants']} updates, "
        f"{row['experts_updated']} experts aggregated, {_sets(row)}, {_updates_vs_dense(row)}, "
        f"{row['bytes_out'] / 1e6:.1f} MB of model shards out")
    if row.get("secagg"):
        sa = row["secagg"]
        extra += (f"; secure aggregation: {sa.get('revealed_units', 0)} sums revealed, "
                  f"withheld {sa.get('withheld') or 'none'}, dropped {sa.get('dropped') or 'none'}")
    return f"{what}: {acc}{extra}"


def _sets(row: dict[str, Any]) -> str:
    """How the devices' trained sets of a round row overlap: 'trained sets: Jaccard 0.31, 22
    distinct experts' (server.rounds.selection_measures)."""
    sel = row.get("selection") or {}
    jac = sel.get("jaccard")
    return (f"trained sets: Jaccard {jac:.2f}" if jac is not None else "trained sets: -") + \
        f", {sel.get('union', 0)} distinct experts"


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate what is still running; kill what does not stop within 30 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def _updates_vs_dense(row: dict[str, Any]) -> str:
    """'X MB of updates (p% of the Y MB dense fedavg-full would send)' for a round row."""
    dense = row.get("dense_bytes") or 0
    share = f" ({100 * row['bytes_in'] / dense:.0f}% of the {dense / 1e6:.0f} MB dense " \
        "fedavg-full would send)" if dense else ""
    return f"{row['bytes_in'] / 1e6:.1f} MB of updates{share}"


def _summary(console: Any, table_cls: Any, run_dir: Path, seconds: float) -> None:
    from server.report import write_report
    from server.store import Store

    rows = _rows(run_dir)
    t = table_cls(title="Rounds")
    for col in ("round", "accuracy", "loss", "ROUGE-L", "participants", "accepted", "Jaccard",
                "experts trained", "MB updates", "dense fedavg-full MB", "share", "MB out",
                "seconds"):
        t.add_column(col)
    for r in rows:
        initial = round_label(r) == INITIAL
        sel = r.get("selection") or {}
        t.add_row(round_label(r),
                  f"{r.get('accuracy', float('nan')):.3f}", f"{r.get('loss', float('nan')):.3f}",
                  f"{r['rougeL']:.3f}" if "rougeL" in r else "-",
                  "" if initial else str(r["participants"]), "" if initial else str(r["accepted"]),
                  f"{sel['jaccard']:.2f}" if sel.get("jaccard") is not None else "",
                  str(sel.get("union", "")),
                  "" if initial else f"{r['bytes_in'] / 1e6:.1f}",
                  "" if initial else f"{r.get('dense_bytes', 0) / 1e6:.1f}",
                  "" if initial or not r.get("dense_bytes") else
                  f"{100 * r['bytes_in'] / r['dense_bytes']:.0f}%",
                  "" if initial else f"{r['bytes_out'] / 1e6:.1f}",
                  "" if initial else f"{r['round_s']:.1f}")
    console.print(t)
    store = Store(run_dir)
    devices = store.devices()
    store.close()
    d = table_cls(title="Devices (emulated profiles)")
    for col in ("device", "profile", "budget", "limited by", "emulated memory",
                "experts sent / round", "with optimizer state", "steps", "last loss"):
        d.add_column(col)
    for name, info in sorted(devices.items()):
        agent_rows = []
        log = run_dir / "agents" / name / "agent.jsonl"
        if log.exists():
            agent_rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        held = [r["held"][name] for r in rows if name in r.get("held", {})]
        rep = info["report"]
        d.add_row(name, str(rep.get("source", "")), str(info["budget"]),
                  str(rep.get("budget", {}).get("limit", "")), _emulated_memory(rep),
                  "/".join(str(h["experts_sent"]) for h in held) or "-",
                  "/".join(str(h["optimizer_experts"]) for h in held) or "-",
                  str(sum(r.get("steps", 0) for r in agent_rows)),
                  f"{agent_rows[-1]['loss']:.3f}" if agent_rows and "loss" in agent_rows[-1]
                  else "-")
    console.print(d)
    console.print(_scale_line(devices))
    size = sum(p.stat().st_size for p in Path(run_dir).rglob("*") if p.is_file())
    console.print(f"finished in {seconds:.0f} s; report: {write_report(run_dir)}; run directory "
                  f"{size / 1e6:.0f} MB (spooled updates deleted once their round is durable, "
                  f"the last checkpoints and the best kept: the server's retention settings)")


def _emulated_memory(rep: dict[str, Any]) -> str:
    """'13.4 MiB of 4.5 GiB': a device's memory at its emulation scale, before the margin."""
    scale = (rep.get("budget") or {}).get("emulation")
    avail = rep.get("memory_available_bytes")
    if not scale or not avail:
        return "-"
    return f"{avail * scale['factor'] / 2**20:.1f} MiB of {avail / 2**30:.1f} GiB"


def _scale_line(devices: dict[str, Any]) -> str:
    """The emulation scale the devices' budgets were planned at, as stored with the run."""
    from device_agent.emulation import EmulationScale

    scales = {json.dumps(s, sort_keys=True): s for s in
              ((i["report"].get("budget") or {}).get("emulation") for i in devices.values()) if s}
    if not scales:
        return "emulation scale: none (the devices planned the model at its own size)"
    return "; ".join(f"emulation scale {EmulationScale.from_dict(s).describe()}: each "
                     f"profile's memory, bandwidth and rates multiplied by it (stored with "
                     f"each device's budget in run.db)" for s in scales.values())


def simulate(args: argparse.Namespace) -> int:
    from lab.simulate import run_simulation

    return run_simulation(args)

"""The README's demo as a user runs it: ``hfedmoe demo`` in a fresh run directory, timed from
the command's start to its exit, with the run's rows (initial evaluation, every round: budgets,
experts sent, bytes against dense fedavg-full, accuracy) and the run directory's size at the end.

    python -m benchmarks.demo --out benchmarks/results/demo.jsonl [-- DEMO ARGS...]

The README's quick start and docs/results.md read these rows (``python -m benchmarks.tables``).
The time includes starting the broker, the server and the six agents (each loads and measures
the model) and the report; it does not include installing the kit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import environment, model_descriptor, write_rows


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_demo(run_dir: Path, demo_args: list[str]) -> tuple[float, int]:
    """Run ``hfedmoe demo`` into ``run_dir``; (wall seconds, exit code)."""
    cmd = [sys.executable, "-m", "hfedmoe.cli", "demo", "--run-dir", str(run_dir), *demo_args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False)
    return time.perf_counter() - start, proc.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/demo.jsonl")
    ap.add_argument("--run-dir", default="", help="default: a fresh temporary directory")
    ap.add_argument("demo_args", nargs="*", help="arguments for hfedmoe demo (after --)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hfedmoe-demo-") as tmp:
        run_dir = Path(args.run_dir or Path(tmp) / "demo")
        wall_s, code = run_demo(run_dir, args.demo_args)
        if code != 0:
            print(f"hfedmoe demo exited with {code}; no rows written", file=sys.stderr)
            return code
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
        server = _server_config(run_dir)
        command = " ".join(["hfedmoe demo", *args.demo_args])
        summary = {"kind": "run", "wall_s": round(wall_s, 1), "rounds": sum(
            r.get("phase") == "round" for r in rows), "run_dir_bytes": _dir_bytes(run_dir)}
    out = [{"bench": "demo", "kind": r.get("phase", "round"), "demo_command": command, **r}
           for r in rows] + [{"bench": "demo", "demo_command": command, **summary}]
    write_rows(args.out, out, environment(benchmark="demo"),
               model_descriptor(server.model, server.train))
    print(f"demo: {wall_s:.0f} s, {summary['rounds']} rounds, run directory "
          f"{summary['run_dir_bytes'] / 1e6:.0f} MB; {len(out)} rows -> {args.out}")
    return 0


def _server_config(run_dir: Path):  # -> ServerConfig
    from hfedmoe.config import load_config
    from server.config import ServerConfig

    return load_config(ServerConfig, run_dir / "server.toml")


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: what expert-level secure aggregation costs per round, against plain aggregation.

Question: at the demo's scale (10 clients, the default model's expert shapes: 6 MoE layers of
8 experts, 148 k parameters each, 384-wide gates, the classifier head), how many bytes does a
client send and receive, and how many seconds do a client and the server spend, in a round
aggregated through the masked protocol (:mod:`hfedmoe.secagg`) instead of plain fp32 updates?
And how many experts does the contributor threshold k withhold?

How it is measured. Each client trains ``k`` experts drawn without replacement with a Zipf-like
popularity (some experts are popular, many are rare, as with non-IID data), plus every gate and
the head; deltas are N(0, 1e-3), usage above tau. Plain: each update encoded with the kit's
wire format (fp32), decoded and added to the streaming aggregator, finalized. Secure:
:func:`lab.secagg.run_secure_round`, every message encoded and decoded, with 0 or 2 dropouts
(one before its masked input, one before unmasking). Bytes per client are means over the
clients (up: client -> server; down: server -> client, the model download left out of both);
seconds are medians over repeats. ``max_abs_err`` is the largest difference between the secure
and the plain global model over the revealed units (quantization and float rounding).

    python -m benchmarks.secagg [--quick] [--experts 6,12,24] [--k 2,3] [--repeats 3]
                                [--out benchmarks/results/secagg.jsonl]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from collections.abc import Sequence
from typing import Any

from benchmarks._common import environment, med, table, write_rows

CLIENTS = 10


def make_updates(shapes: dict[str, list[int]], k: int, n: int, seed: int) -> list[Any]:
    """``n`` updates of ``k`` Zipf-popular experts each, all gates and the head."""
    import torch

    from hfedmoe.names import parse_key
    from hfedmoe.update import SparseUpdate

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    experts = sorted({parse_key(key).expert for key in shapes} - {None})
    popularity = [1.0 / (i + 1) ** 0.8 for i in range(len(experts))]
    order = experts[:]
    rng.shuffle(order)
    out = []
    for c in range(n):
        pick: set = set()
        while len(pick) < k:
            pick.add(rng.choices(order, popularity)[0])
        deltas = {key: torch.randn(shape, generator=g) * 1e-3 for key, shape in shapes.items()
                  if parse_key(key).expert is None or parse_key(key).expert in pick}
        usage = {e: rng.uniform(0.02, 0.12) for e in pick}  # a layer sums to <= 1
        imp = {e: rng.uniform(0.1, 1.0) for e in pick}
        out.append(SparseUpdate("bench", 0, f"c{c}", rng.randint(50, 500), deltas, usage=usage,
                                importance=imp, routed=frozenset(pick), updated=frozenset(pick)))
    return out


def plain_round(updates: list[Any], state: dict[str, Any], spec: Any) -> dict[str, Any]:
    """Encode, decode, add and finalize through the streaming aggregator."""
    from hfedmoe.strategies import get_strategy
    from hfedmoe.wire import decode, encode

    t0 = time.perf_counter()
    blobs = [encode(u, 0.01) for u in updates]
    client_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    agg = get_strategy("hfedmoe").make_aggregator()
    for b, u in zip(blobs, updates, strict=True):
        agg.add(dataclasses.replace(decode(b, spec), client_id=u.client_id))
    new = agg.finalize(state)
    return {"up": sum(map(len, blobs)) / len(blobs), "down": 0.0, "state": new,
            "client_s": client_s / len(blobs), "server_s": time.perf_counter() - t0}


def secure_round(updates: list[Any], state: dict[str, Any], min_k: int,
                 dropouts: bool) -> dict[str, Any]:
    from hfedmoe.secagg import SecAggConfig
    from hfedmoe.strategies import get_strategy
    from lab.secagg import run_secure_round

    cfg = SecAggConfig(enabled=True, min_contributors=min_k)
    drops = {"drop_before_input": {"c0"}, "drop_before_unmask": {"c1"}} if dropouts else {}
    outcome, cost = run_secure_round(updates, state, get_strategy("hfedmoe").rule, cfg, **drops)
    n = len(updates)
    return {"up": cost.up_bytes / n, "down": cost.down_bytes / n, "client_s": cost.client_s / n,
            "server_s": cost.server_s, "outcome": outcome, "phases": cost.phases,
            "state": outcome.state}


def run_config(shapes: dict[str, list[int]], k: int, min_k: int, dropouts: bool,
               repeats: int) -> dict[str, Any]:
    import torch

    from hfedmoe.secagg import unit_of
    from hfedmoe.wire import ModelSpec, ParamSpec

    spec = ModelSpec({key: ParamSpec(tuple(s)) for key, s in shapes.items()})
    state = {key: torch.zeros(s) for key, s in shapes.items()}
    updates = make_updates(shapes, k, CLIENTS, seed=k)
    survivors = [u for u in updates if not (dropouts and u.client_id == "c0")]
    plains = [plain_round(survivors, state, spec) for _ in range(repeats)]
    secures = [secure_round(updates, state, min_k, dropouts) for _ in range(repeats)]
    p, s = plains[0], secures[-1]
    out = s["outcome"]
    err = max((float((s["state"][key] - p["state"][key]).abs().max()) for key in shapes
               if unit_of(key) in out.revealed), default=0.0)
    trained = {unit_of(key) for u in survivors for key in u.deltas if ".experts." in key}
    row = {"clients": CLIENTS, "experts_per_client": k, "min_contributors": min_k,
           "dropouts": 2 if dropouts else 0,
           "experts_trained": len(trained),
           "experts_revealed": sum(1 for x in out.revealed if x.startswith("e:")),
           "withheld": dict(sorted({r: sum(1 for v in out.withheld.values() if v == r)
                                    for r in set(out.withheld.values())}.items())),
           "plain_up_bytes": round(p["up"]), "secure_up_bytes": round(s["up"]),
           "secure_down_bytes": round(s["down"]),
           "plain_client_s": round(med([x["client_s"] for x in plains]), 4),
           "secure_client_s": round(med([x["client_s"] for x in secures]), 4),
           "plain_server_s": round(med([x["server_s"] for x in plains]), 4),
           "secure_server_s": round(med([x["server_s"] for x in secures]), 4),
           "secure_phase_bytes": s["phases"], "max_abs_err": err, "repeats": repeats}
    for what in ("up_bytes", "client_s", "server_s"):
        row[f"ratio_{what}"] = round(row[f"secure_{what}"] / max(row[f"plain_{what}"], 1e-12), 2)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2-expert model, one configuration")
    p.add_argument("--experts", default="6,12,24", help="experts per client (comma list)")
    p.add_argument("--k", default="2,3", help="contributor thresholds (comma list)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    import torch

    from benchmarks.aggregation import model_shapes

    torch.set_num_threads(1)
    model_cfg = {"num_experts": 2, "top_k": 1} if args.quick else {"max_length": 64}
    ks = [1] if args.quick else [int(x) for x in args.experts.split(",")]
    min_ks = [2] if args.quick else [int(x) for x in args.k.split(",")]
    shapes, descriptor = model_shapes(model_cfg)
    rows = []
    for k in ks:
        for min_k in min_ks:
            for dropouts in (False, True):
                r = run_config(shapes, k, min_k, dropouts, 1 if args.quick else args.repeats)
                r.update(bench="secagg", model=descriptor.get("name"))
                rows.append(r)
                print(f"  k={k} min_k={min_k} drop={r['dropouts']}: up x{r['ratio_up_bytes']} "
                      f"server x{r['ratio_server_s']}", flush=True)
    write_rows(args.out, rows, environment(benchmark="secagg", device="cpu"), descriptor)
    print(table([[r["experts_per_client"], r["min_contributors"], r["dropouts"],
                  f"{r['experts_revealed']}/{r['experts_trained']}",
                  r["plain_up_bytes"], r["secure_up_bytes"], r["ratio_up_bytes"],
                  r["secure_down_bytes"], r["plain_client_s"], r["secure_client_s"],
                  r["plain_server_s"], r["secure_server_s"], r["ratio_server_s"],
                  f"{r['max_abs_err']:.1e}"] for r in rows],
                ["experts/client", "k", "drops", "revealed", "plain up B", "secure up B",
                 "up x", "secure down B", "plain client s", "secure client s",
                 "plain server s", "secure server s", "server x", "max err"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark Q4: streaming aggregation time and peak memory vs the number of updates.

Question: does the server's streaming :class:`~hfedmoe.aggregator.Aggregator` keep peak memory
flat as the number of updates in a round grows (10, 50, 100, 200), and how does its time grow,
for updates of the default model's shape carrying 6, 12 or 24 of its 48 experts? Each update is
decoded from real wire bytes (fp32 safetensors, as a device sends them) and added one at a time,
so only one update is in memory at once; the HFedMoE rule (tau filter, importance-weighted
gates) is used. For reference, the batch form (:func:`hfedmoe.aggregation.aggregate`, all
updates held) runs on the smaller rounds. Each configuration runs in a fresh process and its
peak resident memory above the process's state before the round is sampled every 2 ms.

    python -m benchmarks.aggregation [--quick] [--updates 10,50,100,200] [--experts 6,12,24]
                                     [--out r.jsonl]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import (
    RssSampler,
    environment,
    loadavg,
    model_descriptor,
    plot_path,
    pyplot,
    run_isolated,
    savefig,
    table,
    write_rows,
)

MB = 1e6


def _pool(shapes: dict[str, list[int]], k: int, size: int, seed: int) -> list[bytes]:
    """``size`` distinct encoded updates, each with ``k`` random experts, all gates and head."""
    import torch

    from hfedmoe.names import ExpertId, parse_key
    from hfedmoe.update import SparseUpdate
    from hfedmoe.wire import encode

    g = torch.Generator().manual_seed(seed)
    experts = sorted({parse_key(key).expert for key in shapes} - {None})
    per_layer = Counter(e.layer_idx for e in experts)
    blobs = []
    for i in range(size):
        pick = {experts[j] for j in torch.randperm(len(experts), generator=g)[:k].tolist()}
        deltas = {}
        for key, shape in shapes.items():
            e = parse_key(key).expert
            if e is None or e in pick:
                deltas[key] = torch.randn(shape, generator=g) * 1e-3
        # Eq. 16 usage: gate probabilities averaged over tokens, so a layer's sum is <= 1
        usage = {e: float(u) / per_layer[e.layer_idx]
                 for e, u in zip(sorted(pick), torch.rand(k, generator=g).tolist(), strict=True)}
        imp = {e: float(u) for e, u in zip(sorted(pick), torch.rand(k, generator=g).tolist(),
                                           strict=True)}
        upd = SparseUpdate("bench", 0, f"pool{i}", 64, deltas, usage=usage, importance=imp,
                           routed=frozenset(pick), updated=frozenset(pick))
        blobs.append(encode(upd, 0.01))
        del deltas, upd
    assert all(isinstance(e, ExpertId) for e in experts)
    return blobs


def run_config(shapes_path: str, n: int, k: int, mode: str, pool: int = 4,
               seed: int = 0) -> dict:
    """One configuration, meant for a fresh process (:func:`run_isolated`)."""
    import dataclasses

    import torch

    from hfedmoe.aggregation import aggregate
    from hfedmoe.strategies import get_strategy
    from hfedmoe.wire import ModelSpec, ParamSpec, decode

    torch.set_num_threads(1)
    shapes = json.loads(Path(shapes_path).read_text())
    spec = ModelSpec({key: ParamSpec(tuple(s)) for key, s in shapes.items()})
    global_state = {key: torch.zeros(s) for key, s in shapes.items()}
    blobs = _pool(shapes, k, pool, seed)
    rule = get_strategy("hfedmoe").rule
    gc.collect()
    decode_s = add_s = 0.0
    with RssSampler() as mem:
        if mode == "stream":
            agg = get_strategy("hfedmoe").make_aggregator()
            for i in range(n):
                t0 = time.perf_counter()
                upd = dataclasses.replace(decode(blobs[i % pool], spec), client_id=f"c{i}")
                t1 = time.perf_counter()
                agg.add(upd)
                add_s += time.perf_counter() - t1
                decode_s += t1 - t0
                del upd
            add_peak = mem.peak
            t0 = time.perf_counter()
            agg.finalize(global_state)
            finalize_s = time.perf_counter() - t0
            held = sum(s.total.numel() * s.total.element_size() for s in agg._sums.values()
                       if s.total is not None)
        else:
            t0 = time.perf_counter()
            updates = [dataclasses.replace(decode(blobs[i % pool], spec), client_id=f"c{i}")
                       for i in range(n)]
            decode_s = time.perf_counter() - t0
            add_peak = mem.peak
            t0 = time.perf_counter()
            aggregate(global_state, updates, rule)
            finalize_s = time.perf_counter() - t0
            held = sum(t.numel() * t.element_size() for u in updates for t in u.deltas.values())
    update_mb = len(blobs[0]) / MB
    return {"updates": n, "experts_per_update": k, "mode": mode, "update_mb": round(update_mb, 2),
            "decode_s": round(decode_s, 3), "add_s": round(add_s, 3),
            "finalize_s": round(finalize_s, 3),
            "aggregate_s": round(add_s + finalize_s, 3),
            "per_update_ms": round(1000 * (add_s + decode_s) / n, 2),
            "rss_before_mb": round(mem.start / MB, 1),
            "peak_rss_delta_mb": round(mem.delta / MB, 1),
            "peak_rss_delta_during_adds_mb": round((add_peak - mem.start) / MB, 1),
            "sums_or_updates_held_mb": round(held / MB, 1),
            "loadavg_at_measurement": loadavg()}


def model_shapes(model_cfg: dict) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """The update shapes of the model ``model_cfg`` builds, and its descriptor."""
    from hfedmoe.config import ModelConfig
    from hfedmoe.models.registry import build_model

    cfg = ModelConfig(**model_cfg)
    model = build_model(cfg, "classification", 10)
    shapes = {key: list(shape) for key, shape in model.spec().items()}
    return shapes, model_descriptor(cfg, built=model, seq_len=None)


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    for k in sorted({r["experts_per_update"] for r in rows}):
        for mode, style in (("stream", "o-"), ("batch", "s--")):
            rs = sorted((r for r in rows if r["experts_per_update"] == k and r["mode"] == mode),
                        key=lambda r: r["updates"])
            if not rs:
                continue
            xs = [r["updates"] for r in rs]
            if mode == "stream":
                a.plot(xs, [r["add_s"] + r["decode_s"] + r["finalize_s"] for r in rs], style,
                       label=f"{k} experts/update")
            b.plot(xs, [r["peak_rss_delta_mb"] for r in rs], style,
                   label=f"{mode}, {k} experts/update")
    a.set_xlabel("updates in the round")
    a.set_ylabel("decode + add + finalize (s)")
    a.legend(fontsize=7)
    b.set_xlabel("updates in the round")
    b.set_ylabel("peak RSS above start (MB)")
    b.legend(fontsize=6)
    fig.suptitle("Streaming aggregation, default-model-shaped updates", fontsize=9)
    savefig(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2-expert model, 4 and 16 updates")
    p.add_argument("--updates", default=None, help="comma list (default 10,50,100,200)")
    p.add_argument("--experts", default=None, help="experts per update (default 6,12,24)")
    p.add_argument("--batch-upto", type=int, default=None,
                   help="also run the batch form for rounds up to this many updates")
    p.add_argument("--out", default=None, help="append JSON lines here (plot drawn next to it)")
    args = p.parse_args(argv)
    if args.quick:
        model_cfg = {"num_experts": 2, "top_k": 1}
        ns, ks, batch_upto = [4, 16], [3], 4
    else:
        model_cfg = {}
        ns, ks, batch_upto = [10, 50, 100, 200], [6, 12, 24], 50
    ns = [int(x) for x in args.updates.split(",")] if args.updates else ns
    ks = [int(x) for x in args.experts.split(",")] if args.experts else ks
    batch_upto = args.batch_upto if args.batch_upto is not None else batch_upto
    env = environment(benchmark="aggregation", device="cpu", worker_threads=1)
    shapes, descriptor = model_shapes(model_cfg)
    total_experts = len({k.rsplit(".", 1)[0] for k in shapes if ".experts." in k})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shapes_path = Path(tmp) / "shapes.json"
        shapes_path.write_text(json.dumps(shapes))
        configs = [(n, k, "stream") for k in ks for n in ns]
        configs += [(n, ks[len(ks) // 2], "batch") for n in ns if n <= batch_upto]
        for n, k, mode in configs:
            r = run_isolated("benchmarks.aggregation", "run_config",
                             {"shapes_path": str(shapes_path), "n": n, "k": k, "mode": mode})
            r.update(bench="aggregation", model="minilm-moe", model_experts=total_experts,
                     **{f"model_{a}": v for a, v in model_cfg.items()})
            rows.append(r)
            print(f"  {mode:<6} n={n:<4} k={k:<3} peak +{r['peak_rss_delta_mb']} MB "
                  f"{r['per_update_ms']} ms/update", flush=True)
    for r in rows:
        ref = next(x for x in rows if x["mode"] == "stream"
                   and x["experts_per_update"] == r["experts_per_update"] and x["updates"] == ns[0]) \
            if r["mode"] == "stream" else None
        if ref:
            r["peak_ratio_vs_smallest_round"] = round(
                r["peak_rss_delta_mb"] / max(ref["peak_rss_delta_mb"], 1e-9), 2)
            r["time_per_update_ratio_vs_smallest_round"] = round(
                r["per_update_ms"] / max(ref["per_update_ms"], 1e-9), 2)
        if r["mode"] == "batch":
            s = next(x for x in rows if x["mode"] == "stream" and x["updates"] == r["updates"]
                     and x["experts_per_update"] == r["experts_per_update"])
            r["stream_peak_ratio_vs_batch"] = round(
                s["peak_rss_delta_mb"] / max(r["peak_rss_delta_mb"], 1e-9), 3)
    write_rows(args.out, rows, env, descriptor)
    print(f"streaming aggregation, {total_experts}-expert model, update = all gates + head + k "
          "experts (fp32 on the wire)")
    print(table([[r["mode"], r["updates"], r["experts_per_update"], r["update_mb"],
                  r["decode_s"], r["add_s"], r["finalize_s"], r["per_update_ms"],
                  r["peak_rss_delta_mb"], r.get("peak_ratio_vs_smallest_round", ""),
                  r["sums_or_updates_held_mb"]] for r in rows],
                ["mode", "updates", "k", "MB/update", "decode s", "add s", "finalize s",
                 "ms/update", "peak +MB", "peak / smallest", "held MB"]))
    plot(rows, str(plot_path(args.out, "aggregation.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

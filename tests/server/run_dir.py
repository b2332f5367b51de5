"""A run directory as a finished two-round run leaves it: ``metrics.jsonl`` with the initial
evaluation and rounds 0 and 1 (0-based, as rows store them), and ``run.db`` with two devices,
their participation (with step timings), a skip and a rejection. The model has 16 experts: in
round 0 the phone trains 0:1 and 1:2 and the laptop 0:1, in round 1 the phone alone 0:1 and
1:3."""

from __future__ import annotations

import json
from pathlib import Path

from server.store import Store

ROWS = [
    {"round": -1, "phase": "initial", "time": 100.0, "accuracy": 0.3125, "loss": 1.25},
    {"round": 0, "phase": "round", "time": 110.0, "participants": 2, "accepted": 2,
     "rejected": 0, "late": 0, "experts_updated": 3, "bytes_in": 3000, "bytes_out": 9000,
     "dense_bytes": 12000, "aggregation_s": 0.01, "round_s": 9.5, "accuracy": 0.375,
     "loss": 1.125, "devices": {"phone": {"updated": ["0:1", "1:2"]},
                                "laptop": {"updated": ["0:1"]}},
     "held": {"phone": {"budget": 2, "experts_sent": 2, "steps": 5, "limit": "memory",
                        "expert_ids": ["0:1", "1:2"]},
              "laptop": {"budget": 4, "experts_sent": 1, "steps": 5, "limit": "time",
                         "expert_ids": ["0:1"]}},
     "selection": {"clients": 2, "jaccard": 0.5, "overlap_coef": 1.0, "union": 2,
                   "coverage": 0.125},
     "skipped": {}},
    {"round": 1, "phase": "round", "time": 121.0, "participants": 2, "accepted": 1,
     "rejected": 1, "late": 0, "experts_updated": 2, "bytes_in": 2000, "bytes_out": 9000,
     "dense_bytes": 6000, "aggregation_s": 0.01, "round_s": 10.5, "accuracy": 0.5,
     "loss": 1.0, "devices": {"phone": {"updated": ["0:1", "1:3"]}},
     "held": {"phone": {"budget": 2, "experts_sent": 2, "steps": 5, "limit": "memory",
                        "expert_ids": ["0:1", "1:3"]}},
     "selection": {"clients": 1, "jaccard": None, "overlap_coef": None, "union": 2,
                   "coverage": 0.125},
     "skipped": {"laptop": ["battery 8% < 30% and not charging"]}},
]
STEP = {"step": {"median": 0.02, "p90": 0.03}, "forward": {"median": 0.01}, "steps": 5}


def write_run(run_dir: Path) -> Path:
    """Fill ``run_dir`` (created) with the run above; returns it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    store = Store(run_dir)
    try:
        store.upsert_device("phone", {"emulated": True, "source": "phone-midrange-6gb",
                                      "budget": {"limit": "memory", "step_seconds": 0.2}}, 2)
        store.upsert_device("laptop", {"platform": "linux-x86_64", "cpu_model": "Ryzen 7"}, 4)
        for round_idx, device, budget, nbytes in ((0, "phone", 2, 1500), (0, "laptop", 4, 1500),
                                                  (1, "phone", 2, 2000)):
            held = ROWS[round_idx + 1]["held"][device]
            store.record_participation(round_idx, device, budget, held["experts_sent"],
                                       held["experts_sent"],
                                       {"bytes": nbytes, "expert_ids": held["expert_ids"],
                                        "latency": STEP})
        store.record_skip(1, "laptop", ["battery 8% < 30% and not charging"],
                          {"battery_pct": 8, "charging": False})
        store.reject(1, "laptop", "late", "round 1 closed")
    finally:
        store.close()
    return run_dir

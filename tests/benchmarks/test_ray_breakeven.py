"""``benchmarks/ray_breakeven.py``: both backends at each N give the same rows and a row each
with their timings (Ray's start apart); the summary names the smallest N at which Ray wins; the
results region shows the last run."""

from __future__ import annotations

import json

import pytest

from benchmarks import tables
from benchmarks._common import write_rows
from benchmarks._tables import Results, render
from benchmarks.ray_breakeven import first_win, summary


def _run(n: int, backend: str, wall: float, per_round: float | None, **kw) -> dict:
    return {"bench": "ray-breakeven", "kind": "run", "devices": n, "backend": backend,
            "wall_s": wall, "start_s": 9.0 if backend == "ray" else 0.0,
            "round_s_after_first": per_round, "rows_equal": True,
            "ray_workers": min(2, n) if backend == "ray" else None, **kw}


def test_the_summary_names_the_smallest_n_at_which_ray_wins():
    runs = [_run(1, "sequential", 10.0, 2.0), _run(1, "ray", 20.0, 2.5),
            _run(4, "sequential", 30.0, 8.0), _run(4, "ray", 35.0, 5.0),
            _run(16, "sequential", 90.0, 30.0), _run(16, "ray", 60.0, 17.0)]
    s = summary(runs)
    assert s["devices"] == [1, 4, 16]
    assert s["ray_wins_per_round_from"] == 4 and s["ray_wins_whole_run_from"] == 16
    assert s["rows_equal"] is True
    one_round = [_run(2, "sequential", 10.0, None), _run(2, "ray", 20.0, None)]
    assert first_win(one_round, "round_s_after_first") is None  # nothing after the first
    assert first_win(one_round, "wall_s") is None


def test_the_region_shows_the_last_run(tmp_path):
    old = [_run(2, "sequential", 11.0, 3.0, started_at=1), _run(2, "ray", 99.0, 3.5,
                                                                 started_at=1)]
    new = [_run(2, "sequential", 12.0, 4.0, started_at=2), _run(2, "ray", 11.5, 2.5,
                                                                 started_at=2)]
    rows = [*old, {**summary(old), "rounds": 3, "steps": 4, "started_at": 1},
            *new, {**summary(new), "rounds": 3, "steps": 4, "started_at": 2}]
    write_rows(tmp_path / "ray-breakeven.jsonl", rows, {"git_sha": "abc1234"})
    text = render(tables.REGIONS["ray-breakeven"], Results(tmp_path))
    assert "| 2 | 2 | 12.0 | 11.5 | 9.0 | 4.00 | 2.50 | yes |" in text
    assert "99.0" not in text
    assert "per round (the mean of the rounds after the first) from **2** devices" in text
    assert "its start included, from **2** devices" in text


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_mode_runs_both_backends_with_the_same_rows(tmp_path, minilm_available):
    ray = pytest.importorskip("ray")
    if not minilm_available:
        pytest.skip("the MiniLM assets wheel is not installed")
    from benchmarks import ray_breakeven

    out = tmp_path / "r.jsonl"
    assert ray_breakeven.main(["--quick", "--devices", "2", "--out", str(out)]) == 0
    assert not ray.is_initialized()  # the local Ray each run started is shut down
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    runs, s = rows[:-1], rows[-1]
    assert [(r["devices"], r["backend"]) for r in runs] == [(2, "sequential"), (2, "ray")]
    for r in runs:
        assert r["rows_equal"] is True and r["differences"] == []
        assert len(r["round_wall_s"]) == r["rounds"] == 2
        assert r["round_s_after_first"] == r["round_wall_s"][1]
        assert r["wall_s"] > r["setup_s"] + r["start_s"] + sum(r["round_wall_s"]) * 0.99
        assert r["env"]["loadavg"] and r["loadavg_before"]
        assert r["descriptor"]["experts_per_layer"] == 2
    seq, par = runs
    assert par["ray_workers"] == 2 and seq["ray_workers"] is None
    assert par["start_s"] > 0 and par["close_s"] > 0  # Ray's start and shutdown, timed apart
    assert s["kind"] == "summary" and s["devices"] == [2] and s["rows_equal"] is True
    assert s["ray_wins_per_round_from"] in (None, 2)
    assert s["ray_wins_whole_run_from"] == (2 if par["wall_s"] < seq["wall_s"] else None)

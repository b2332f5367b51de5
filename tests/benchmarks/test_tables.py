"""The generated results: the committed docs equal what benchmarks/tables.py writes, an edited
figure fails the check, and a region marked default whose rows were measured on another model
is reported stale."""

import json
import shutil
from pathlib import Path

from benchmarks import tables
from benchmarks._common import ROOT, default_descriptor, model_descriptor, write_rows
from benchmarks._tables import Results, check, render, stale_regions

RESULTS = ROOT / "benchmarks" / "results"


def copy_docs(tmp_path: Path) -> Path:
    for doc in tables.DOCS:
        (tmp_path / doc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / doc, tmp_path / doc)
    return tmp_path


def test_committed_docs_equal_the_generated():
    assert check(ROOT, Results(RESULTS)) == []


def test_an_edited_number_fails_the_check(tmp_path, capsys):
    root = copy_docs(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    assert "1.09x one raw" in text  # inside the transport-headline region
    readme.write_text(text.replace("1.09x one raw", "1.19x one raw"))
    assert tables.main(["--check", "--root", str(root), "--results", str(RESULTS)]) == 1
    assert "-" in capsys.readouterr().out
    assert tables.main(["--root", str(root), "--results", str(RESULTS)]) == 0  # rewrite
    assert tables.main(["--check", "--root", str(root), "--results", str(RESULTS)]) == 0


def _detach_rows(descriptor: dict) -> list[dict]:
    base = {"bench": "detach", "budget": 12, "impl": "sorted", "descriptor": descriptor}
    return [{**base, "kind": "grad_agreement", "batches": 2, "cos_all_median": 0.9,
             "cos_all_min": 0.8, "cos_expert_median": 0.8, "cos_expert_min": 0.5,
             "rel_norm_err_median": 0.4},
            *({**base, "kind": "train_eval", "detach_frozen": d, "steps": 3,
               "test_accuracy": 0.5, "test_loss": 1.0} for d in (False, True))]


def test_a_default_region_on_another_model_is_stale(tmp_path, capsys):
    old = {**default_descriptor(), "upcycle": "copy", "params": 72213514}
    write_rows(tmp_path / "detach.jsonl", _detach_rows(old), {"git_sha": "abc1234"})
    assert [r.name for r in stale_regions(Results(tmp_path), ["detach"])] == ["detach"]
    text = render(tables.REGIONS["detach"], Results(tmp_path))
    assert "**stale**" in text and "72,213,514 params" in text and "0.500" not in text


def test_a_default_region_on_the_default_model_is_current(tmp_path):
    write_rows(tmp_path / "detach.jsonl", _detach_rows(default_descriptor()),
               {"git_sha": "abc1234"})
    assert stale_regions(Results(tmp_path), ["detach"]) == []
    text = render(tables.REGIONS["detach"], Results(tmp_path))
    assert "0.500" in text and "abc1234" in text and "stale" not in text


def test_rows_record_their_command_and_descriptor(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", [str(ROOT / "benchmarks" / "latency.py"), "--quick"])
    write_rows(tmp_path / "r.jsonl", [{"x": 1}], {}, model_descriptor(batch_size=4))
    row = json.loads((tmp_path / "r.jsonl").read_text())
    assert row["env"]["command"] == "python -m benchmarks.latency --quick"
    assert row["descriptor"]["batch_size"] == 4
    assert row["descriptor"]["upcycle"] == default_descriptor()["upcycle"]


def _demo_rows() -> list[dict]:
    held = {f"dev{i}": {"budget": b, "experts_sent": b, "optimizer_experts": b,
                        "budget_limit": "quota"} for i, b in enumerate((4, 12))}
    rounds = [{"bench": "demo", "kind": "round", "phase": "round", "round": i,
               "accuracy": acc, "held": held, "bytes_in": 25_000_000, "dense_bytes": 100_000_000}
              for i, acc in enumerate((0.75, 0.875))]
    return [{"bench": "demo", "kind": "initial", "phase": "initial", "round": -1,
             "accuracy": 0.125}, *rounds,
            {"bench": "demo", "kind": "run", "wall_s": 91.4, "rounds": 2,
             "run_dir_bytes": 57_000_000}]


def test_the_quick_start_reads_the_last_demo_run(tmp_path):
    stale = [{**r, "accuracy": 0.5} if "accuracy" in r else r for r in _demo_rows()]
    write_rows(tmp_path / "demo.jsonl", stale + _demo_rows(), {"git_sha": "abc1234"},
               default_descriptor())
    text = render(tables.REGIONS["demo-quickstart"], Results(tmp_path))
    assert text.startswith("a run took 91 s and raised held-out accuracy from 0.125 (the "
                           "initial model) to 0.875 over 2 rounds")
    assert "trained 4, 12 experts (budgets limited by: quota)" in text
    assert "25.0 MB, 25% of the 100.0 MB dense fedavg-full" in text and "0.500" not in text
    write_rows(tmp_path / "demo.jsonl", _demo_rows(), {"git_sha": "abc1234"},
               {**default_descriptor(), "upcycle": "copy"})  # a later run on another model
    assert "**stale**" in render(tables.REGIONS["demo-quickstart"], Results(tmp_path))


def test_a_region_without_rows_says_how_to_measure_it(tmp_path):
    text = render(tables.REGIONS["detach"], Results(tmp_path))
    assert text.strip().startswith("*Not measured yet: `python -m benchmarks.detach")

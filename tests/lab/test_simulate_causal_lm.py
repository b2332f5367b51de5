"""``hfedmoe simulate`` of a causal MoE LM (the bundled prompt/response pairs, non-IID by
topic): HFedMoE with LoRA on the experts, the shared experts and the attention over a frozen
tiny Qwen2-MoE with the offline byte-level tokenizer. What a user sees: the metrics rows and
the report."""

from __future__ import annotations

import json

import pytest

from hfedmoe.cli import main

CONFIG = """
run_dir = "{run_dir}"
max_eval_examples = 48
eval_generate_examples = 8
eval_max_new_tokens = 16
[model]
name = "qwen2-moe-tiny"
max_length = 160
lora_targets = ["attention"]
[data]
task = "causal-lm"
alpha = 0.5
[method]
strategy = "hfedmoe"
[train]
adapter = "lora"
lr = 1e-2
batch_size = 8
max_steps = 4
threads = 1
[rounds]
rounds = 3
train_time_s = 10.0
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("chatterbot_corpus")
    pytest.importorskip("rouge_score")
    tmp = tmp_path_factory.mktemp("lm")
    cfg = tmp / "lm.toml"
    cfg.write_text(CONFIG.format(run_dir=tmp / "run"))
    code = main(["simulate", "--config", str(cfg), "--devices", "3"])
    rows = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    return code, rows, (tmp / "run" / "report.html").read_text(encoding="utf-8")


def test_the_held_out_loss_falls_over_three_rounds(run):
    code, rows, _ = run
    assert code == 0
    assert [r["phase"] for r in rows] == ["initial", "round", "round", "round"]
    assert rows[-1]["loss"] < rows[0]["loss"]
    for r in rows:
        assert r["perplexity"] == pytest.approx(2.718281828459045 ** r["loss"])
        assert r["examples"] == 48 and r["eval_split"] == "test"
        # per domain: every topic of the capped split (taken topic by topic in turn)
        assert len(r["per_domain"]) >= 10
        assert sum(d["examples"] for d in r["per_domain"].values()) == 48


def test_rouge_l_is_in_every_row(run):
    _, rows, _ = run
    for r in rows:
        assert 0.0 <= r["rougeL"] <= 1.0 and r["rougeL_examples"] == 8
        assert len(r["samples"]) == 3 and all("generated" in s for s in r["samples"])
        assert sum("rougeL" in d for d in r["per_domain"].values()) == 8  # 8 prompts, 8 topics


def test_every_update_is_lora_factors(run):
    _, rows, _ = run
    for r in rows[1:]:
        assert r["accepted"] == 3
        assert all(h["bytes"] < r["dense_bytes"] / 4 for h in r["held"].values())


def test_the_report_shows_the_language_model(run):
    _, rows, html = run
    assert "<h2>Language model</h2>" in html and "<h3>ROUGE-L per domain</h3>" in html
    assert f"<td class='num'>{rows[-1]['rougeL']:.4f}</td>" in html
    assert f"<td class='num'>{rows[-1]['loss']:.4f}</td>" in html
    assert "Generations after round 3" in html


@pytest.mark.parametrize(("rows", "overrides", "error", "says"), [
    ([{"question": "q", "answer": "a"}], [], "DataError",
     "line 1: missing column 'prompt'; columns are: question, answer"),
    ([{"prompt": "q", "response": "a"}, {"prompt": "q2", "response": ""}], [], "DataError",
     "line 2: empty response in column 'response'"),
    ([{"prompt": "q" * 40, "response": "a", "label": "x"}] * 4, ["model.max_length=32"],
     "DataError", "the prompt is 41 tokens, which leaves no room for its response within "
                  "model.max_length = 32"),
    ([{"prompt": "q", "response": "a"}] * 4, ['model.lora_targets=["qkv"]'], "ModelError",
     "model.lora_targets: 'qkv' matches no linear layer of qwen2-moe"),
])
def test_bad_input_is_a_typed_error_naming_what_is_wrong(tmp_path, capsys, rows, overrides,
                                                        error, says):
    from hfedmoe.errors import DataError, ModelError

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["simulate", "--devices", "2", "--run-dir", str(tmp_path / "run"),
                 "--set", 'model.name="qwen2-moe-tiny"', "--set", 'data.task="causal-lm"',
                 "--set", f'data.source="{data}"', "--set", 'train.adapter="lora"',
                 *[x for o in overrides for x in ("--set", o)]])
    err = capsys.readouterr().err
    assert code == {"DataError": DataError, "ModelError": ModelError}[error].exit_code
    assert f"hfedmoe simulate: {error}: " in err and says in err

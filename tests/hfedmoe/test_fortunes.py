"""The ``"fortunes"`` source: Debian's fortune cookies as topic classification."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hfedmoe.config import DataConfig
from hfedmoe.data import fortunes_classification, load_dataset, load_task, read_fortunes
from hfedmoe.data.fortunes import DEFAULT_DIR, ENV_DIR, clean_entry
from hfedmoe.errors import DataError


def write_fortunes(d: Path, files: dict[str, str | bytes]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return d


ALPHA = ("A\bAn apple\n%\n"                 # bold by overstrike
         "_\bb_\bo_\bl_\bd word\n%\n"        # underline by overstrike
         "\n%\n"                             # an empty entry
         "An   apple\n%\n"                   # the first entry again once cleaned
         "third\tone\n   over two lines\n%\n"
         "the ____\b\b\b\bLAST time\n")      # grouped underline, no trailing %
BETA = b"b one\n%\nb two\n%\n%\nAn apple\n%\ncaf\xe9 three\n%\n"  # Latin-1 byte, a repeat


@pytest.fixture
def fake_dir(tmp_path):
    return write_fortunes(tmp_path / "fortunes", {
        "alpha": ALPHA, "beta": BETA,
        "tiny": "only one\n%\nonly two\n",           # under the minimum of 3
        "alpha.dat": b"\x00\x00\x00\x02binary index",  # strfile index: skipped
        "alpha.u8": "not\n%\nread\n%\nat all\n",       # link / UTF-8 copy: skipped
        "off/rude": "skipped\n%\nfolder\n%\nentries\n",  # the offensive folder: skipped
    })


def test_clean_entry_replays_overstrike_and_collapses_whitespace():
    assert clean_entry("A\bAB\bBC\bC") == "ABC"
    assert clean_entry("_\bX_\bY z") == "XY z"
    assert clean_entry("X\b_") == "X"  # an underscore never hides the letter under it
    assert clean_entry("in your whole ____\b\b\b\bBODY!") == "in your whole BODY!"
    assert clean_entry("  two\n\tlines  \n") == "two lines"
    assert clean_entry("\b\bstart") == "start"  # a backspace at the line start stays put


def test_reader_cleans_drops_empty_and_duplicates_and_skips_non_category_files(fake_dir):
    pairs = read_fortunes(fake_dir)
    assert pairs == [
        ("alpha", "An apple"), ("alpha", "bold word"), ("alpha", "third one over two lines"),
        ("alpha", "the LAST time"),
        ("beta", "b one"), ("beta", "b two"), ("beta", "caf\ufffd three"),
        ("tiny", "only one"), ("tiny", "only two"),
    ]


def test_classification_keeps_categories_with_enough_texts(fake_dir):
    data = fortunes_classification(min_examples=3, directory=fake_dir)
    assert data.label_names == ("alpha", "beta")
    assert data.texts == ("An apple", "bold word", "third one over two lines", "the LAST time",
                          "b one", "b two", "caf\ufffd three")
    assert data.labels == (0, 0, 0, 0, 1, 1, 1)
    assert fortunes_classification(min_examples=2, directory=fake_dir).label_names == (
        "alpha", "beta", "tiny")
    with pytest.raises(DataError, match="no fortune category has 5 distinct texts"):
        fortunes_classification(min_examples=5, directory=fake_dir)


def test_the_env_var_names_the_directory_of_the_source(tmp_path, monkeypatch):
    files = {f"cat{c}": "\n%\n".join(f"cat{c} text {j}" for j in range(60)) for c in range(2)}
    files["few"] = "\n%\n".join(f"few {j}" for j in range(49))  # one short of the default 50
    d = write_fortunes(tmp_path / "elsewhere", files)
    monkeypatch.setenv(ENV_DIR, str(d))
    data = load_dataset(DataConfig(source="fortunes"))
    assert data.label_names == ("cat0", "cat1") and len(data) == 120
    task = load_task(DataConfig(source="fortunes", test_fraction=0.25))
    assert len(task.test) == 30 and task.test.label_counts() == {"cat0": 15, "cat1": 15}


def test_a_missing_directory_is_a_data_error_that_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "absent"))
    with pytest.raises(DataError, match=r"absent: no fortunes directory; install the data "
                                        r"with `apt-get install fortunes fortunes-min`"):
        load_task(DataConfig(source="fortunes"))
    with pytest.raises(DataError, match="apt-get install fortunes fortunes-min"):
        read_fortunes(write_fortunes(tmp_path / "only-indexes", {"x.dat": b"\x00"}))


def test_fortunes_is_classification_only(fake_dir, monkeypatch):
    monkeypatch.setenv(ENV_DIR, str(fake_dir))
    with pytest.raises(DataError, match="'fortunes' dataset is a classification task"):
        load_dataset(DataConfig(source="fortunes", task="causal-lm"))


def test_the_installed_fortunes(monkeypatch):
    monkeypatch.delenv(ENV_DIR, raising=False)
    if not (Path(DEFAULT_DIR) / "computers").is_file():
        if os.environ.get("HFEDMOE_REQUIRE_FORTUNES"):
            pytest.fail(f"{DEFAULT_DIR} is missing (apt-get install fortunes fortunes-min)")
        pytest.skip(f"{DEFAULT_DIR} not installed (apt-get install fortunes fortunes-min)")
    data = fortunes_classification()
    assert len(data.label_names) >= 35 and len(data) >= 14_000
    assert {"computers", "literature", "riddles"} <= set(data.label_names)
    assert not {"pratchett", "ascii-art", "translate-me", "magic"} & set(data.label_names)
    assert min(data.label_counts().values()) >= 50
    assert len(set(data.texts)) == len(data)
    assert all(t and "\b" not in t and t == " ".join(t.split()) for t in data.texts)
    assert fortunes_classification().texts == data.texts  # deterministic

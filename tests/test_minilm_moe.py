"""The default model: pretrained MiniLM-L6 upcycled into an MoE classifier."""

import pytest
import torch

from hfedmoe.config import ModelConfig
from hfedmoe.models import build_model
from hfedmoe.models.minilm import load_minilm, upcycle_bert
from hfedmoe.names import ExpertId

SENTENCES = ["how do I reset my router", "tell me a joke about computers",
             "what is the capital of France?"]


@pytest.fixture(scope="module")
def dense_and_batch(minilm_available):
    if not minilm_available:
        pytest.skip("assets extra not installed")
    encoder, tok = load_minilm()
    encoder.eval()
    b = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        dense = encoder(**b).last_hidden_state
    return dense, b


@pytest.mark.parametrize("mode,impl", [("copy", "grouped"), ("copy", "eager"),
                                       ("copy", "dense"), ("split", "grouped")])
def test_upcycled_hidden_states_equal_the_dense_model(dense_and_batch, mode, impl):
    dense, b = dense_and_batch
    encoder, _ = load_minilm()
    encoder.eval()
    torch.manual_seed(0)
    layers = upcycle_bert(encoder, num_experts=8, top_k=2, mode=mode, impl=impl)
    with torch.no_grad():
        moe = encoder(**b).last_hidden_state
    assert len(layers) == 6
    assert (moe - dense).abs().max().item() < 1e-4


def test_router_receives_gradients_right_after_conversion(minilm_available):
    if not minilm_available:
        pytest.skip("assets extra not installed")
    model = build_model(ModelConfig(), num_labels=4)
    model.set_trainable([ExpertId(0, 0), ExpertId(5, 1)])
    b = model.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    out = model.module(**b, labels=torch.tensor([0, 1, 3]))
    out.loss.backward()
    for layer in model.layers:
        g = layer.router.weight.grad
        assert g is not None and g.abs().sum() > 0, f"router {layer.layer_idx} got no gradient"
    trained = {k for k, p in model.trainable_parameters().items() if p.grad is not None}
    assert "layers.0.experts.0.w_in" in trained and "layers.0.experts.1.w_in" not in trained
    s = model.summary()
    assert s["moe_layers"] == 6 and s["experts_per_layer"] == [8] * 6 and s["top_k"] == [2] * 6

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


@pytest.mark.slow
def test_moefied_experts_differ_and_the_router_predicts_them(dense_and_batch):
    """MoEfication: clustered experts, a router whose top-k tracks the clusters that matter."""
    from hfedmoe.models.minilm import _ffn_inputs, calibration_texts
    from hfedmoe.models.moefy import balanced_kmeans

    dense, b = dense_and_batch
    encoder, tok = load_minilm()
    encoder.eval()
    probe = _ffn_inputs(encoder, tok, calibration_texts()[-64:], [0])[0]  # before conversion
    fc_in = encoder.encoder.layer[0].intermediate.dense
    with torch.no_grad():
        h = torch.nn.functional.gelu(fc_in(probe))  # (T, 1536)
    layers = upcycle_bert(encoder, num_experts=8, top_k=2, mode="moefy", impl="sorted",
                          tokenizer=tok)
    bank, router = layers[0].bank, layers[0].router
    assert bank.shape.d_ff == 1536 // 8
    # every neuron went to exactly one expert, and experts hold different neurons
    rows = torch.cat([e.w_in.detach() for e in bank.experts])
    assert torch.equal(rows.sort(0).values, fc_in.weight.detach().sort(0).values)
    # the router's top-2 finds the two clusters whose output matters most far above chance
    with torch.no_grad():
        contrib = torch.stack([(e(probe) - e.b_out).norm(dim=1) for e in bank.experts],
                              1)  # (T, 8): each cluster's share of the FFN output
        picked = router(probe)[2]  # (T, 2)
    best = contrib.topk(2, dim=1).indices
    hit = (picked.unsqueeze(-1) == best.unsqueeze(1)).any(-1).float().mean().item()
    assert hit > 0.5  # chance is 0.25
    # gate scores are far from uniform, unlike a copy-upcycled router's
    with torch.no_grad():
        probs = torch.softmax(router(probe)[0], -1)
    assert probs.max(-1).values.mean().item() > 0.18  # uniform would be 0.125
    # a quarter of each FFN active moves the sentence embedding (cosine 0.56-0.70 to the dense
    # model's on these sentences, before any fine-tuning), but it stays related to it
    with torch.no_grad():
        moe = encoder(**b).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(moe.mean(1), dense.mean(1), dim=-1)
    assert cos.min().item() > 0.4
    assert balanced_kmeans(h.T[:16], 4).bincount().tolist() == [4, 4, 4, 4]

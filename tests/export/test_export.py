"""Export for phones: .pte and ONNX inference parity, ExecuTorch training parity with eager SGD.

Tolerances (float32): inference logits max|diff| <= 1e-4 (.pte vs eager, ONNX vs eager, .pte vs
ONNX); training losses and parameter updates after 5 SGD steps max|diff| <= 1e-5; experts
outside the trained set are bit-identical. Training programs on the ``"capacity"`` expert path
match eager SGD on the same path (the same pairs dropped), and at capacity factor E/k (nothing
dropped) the dense programs' numbers.
"""

import copy

import pytest
import torch

pytest.importorskip("executorch")
pytest.importorskip("onnxruntime")

from export.common import example_inputs  # noqa: E402
from export.executorch import (  # noqa: E402
    export_inference_pte,
    load_inference,
    run_inference,
    training_key,
)
from export.onnx import export_onnx, run_onnx, session  # noqa: E402
from export.programs import (  # noqa: E402
    TrainingProgram,
    bucket_for,
    export_mode,
    flat_expert_index,
    masked_router_forward,
)
from export.runtime import ExecuTorchTrainer, ProgramCache, bucket_holding  # noqa: E402
from export.training import TRAIN_TOL, training_parity  # noqa: E402
from hfedmoe.errors import ExportError  # noqa: E402
from hfedmoe.models.base import MoEModel  # noqa: E402
from hfedmoe.models.hf import build_hf_model  # noqa: E402
from hfedmoe.models.minilm import SequenceClassifier, upcycle_bert  # noqa: E402
from hfedmoe.names import ExpertId  # noqa: E402

INFER_TOL = 1e-4
E = ExpertId


def tiny_bert_moe(num_experts: int = 4, seed: int = 0) -> MoEModel:
    """A random-init 2-layer BERT (hidden 32, GELU) upcycled to MoE, experts made distinct."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, hidden_act="gelu")
    encoder = BertModel(cfg, add_pooling_layer=False)
    layers = upcycle_bert(encoder, num_experts, top_k=2, init_std=0.5)
    with torch.no_grad():
        for layer in layers:
            for expert in layer.bank.experts:
                for p in expert.parameters():
                    p.add_(0.05 * torch.randn_like(p))
    module = SequenceClassifier(encoder, 32, 3)
    module.eval()
    return MoEModel(module, "bert-tiny", "classification", layers,
                    shared={"classifier": module.classifier}, info={"num_labels": 3})


@pytest.fixture(scope="module")
def bert():
    return tiny_bert_moe()


@pytest.fixture(scope="module")
def qwen():
    return build_hf_model("qwen3-moe", "classification", num_labels=3)


@pytest.fixture(scope="module")
def cache():
    return ProgramCache()


# --- pure helpers -------------------------------------------------------------------------------
def test_buckets_round_down_and_slot_index_pads(qwen):
    assert [bucket_for(b) for b in (1, 2, 3, 4, 7, 8, 20)] == [1, 2, 2, 4, 4, 8, 8]
    assert [bucket_holding(n) for n in (1, 2, 3, 5)] == [1, 2, 4, 8]
    with pytest.raises(ExportError):
        bucket_for(0)
    idx = flat_expert_index(qwen, [E(0, 1), E(1, 3)], 4)
    assert idx.tolist() == [1, 7, -1, -1]  # layer * num_experts + expert, padded with -1
    with pytest.raises(ExportError):
        flat_expert_index(qwen, [E(0, 1), E(0, 1)], 2)
    with pytest.raises(ExportError):
        flat_expert_index(qwen, [E(0, 0), E(0, 1), E(0, 2)], 2)


def test_masked_router_equals_router_for_a_zero_mask(bert, qwen):
    x = torch.randn(10, 32)
    for model in (bert, qwen):
        for layer in model.layers:
            want = layer.router(x)
            got = masked_router_forward(layer.router, x, torch.zeros(layer.num_experts))
            for w, g in zip(want, got, strict=True):
                torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_training_program_forward_equals_the_model_in_frozen_mode(bert):
    b = example_inputs(bert, 2, 8)
    trainable = set(bert.trainable_parameters())
    with torch.no_grad():
        want = bert.module(**b).logits
    with export_mode(bert, attn="eager"):
        prog = TrainingProgram(bert, 2, "frozen")
        prog.load_slots([E(0, 1), E(1, 3)])
        loss, logits = prog(b["input_ids"], b["attention_mask"], b["labels"],
                            flat_expert_index(bert, [E(0, 1), E(1, 3)], 2))
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-6)
    assert set(bert.trainable_parameters()) == trainable  # export_mode restored the model
    assert not prog.slot("w_in").requires_grad or prog.slot("w_in").shape == (2, 64, 32)
    assert all(layer.bank.impl == "grouped" for layer in bert.layers)


# --- inference ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bert", "qwen"])
def test_inference_parity_eager_pte_onnx(name, request, tmp_path):
    model = request.getfixturevalue(name)
    buffer, report = export_inference_pte(model, batch=2, seq=12, backend="xnnpack",
                                          out=tmp_path / "m.pte")
    assert report.ok and report.size_bytes == len(buffer) > 0
    onnx_report = export_onnx(model, tmp_path / "m.onnx", batch=2, seq=12)
    assert onnx_report.ok, onnx_report.format()
    b = example_inputs(model, 2, 12, seed=5)  # the same inputs for all three
    with torch.no_grad():
        eager = model.module(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    pte = run_inference(load_inference(buffer), b["input_ids"], b["attention_mask"])
    ort = run_onnx(session(tmp_path / "m.onnx"), b["input_ids"], b["attention_mask"])
    torch.testing.assert_close(pte, eager, rtol=0, atol=INFER_TOL)
    torch.testing.assert_close(ort, eager, rtol=0, atol=INFER_TOL)
    torch.testing.assert_close(pte, ort, rtol=0, atol=INFER_TOL)
    if onnx_report.info["dynamic_seq"]:  # another sequence length through the same file
        b = example_inputs(model, 2, 20, seed=6)
        with torch.no_grad():
            eager = model.module(input_ids=b["input_ids"],
                                 attention_mask=b["attention_mask"]).logits
        ort = run_onnx(session(tmp_path / "m.onnx"), b["input_ids"], b["attention_mask"])
        torch.testing.assert_close(ort, eager, rtol=0, atol=INFER_TOL)


# --- training -----------------------------------------------------------------------------------
def _check_parity(parity):
    assert len(parity.losses_executorch) == 5
    for got, want in zip(parity.losses_executorch, parity.losses_eager, strict=True):
        assert abs(got - want) <= TRAIN_TOL * max(1.0, abs(want))
    assert set(parity.deltas_executorch) == set(parity.deltas_eager)
    for key, delta in parity.deltas_executorch.items():
        torch.testing.assert_close(delta, parity.deltas_eager[key], rtol=0, atol=TRAIN_TOL)


def test_training_program_matches_eager_sgd_and_trains_only_the_selection(bert, cache):
    selected = [E(0, 1), E(1, 0), E(1, 3)]  # 3 experts: the bucket-4 program, one slot unused
    before = bert.state()
    trainer, parity = training_parity(bert, selected, batch=2, seq=8, steps=5, lr=0.5,
                                      cache=cache)
    _check_parity(parity)
    assert trainer.bucket == 4
    trained = {f"layers.{e.layer_idx}.experts.{e.expert_idx}.{p}" for e in selected
               for p in ("w_in", "w_out", "b_in", "b_out")}
    gates_and_head = {"layers.0.gate.weight", "layers.1.gate.weight",
                      "shared.classifier.weight", "shared.classifier.bias"}
    deltas = trainer.deltas()
    assert set(deltas) == trained | gates_and_head
    assert all(deltas[k].abs().max() > 0 for k in trained)
    assert trainer.module.named_parameters()["slot_w_in"][3].abs().max() == 0  # unused slot
    # Applying the update moves the selected experts only: the others stay bit-identical.
    updated = copy.deepcopy(bert)
    updated.load_state({k: before[k] + d for k, d in deltas.items()})
    after = updated.state()
    for key in before:
        if key not in deltas:
            assert torch.equal(after[key], before[key]), key
    assert all(torch.equal(bert.state()[k], before[k]) for k in before)


def test_one_program_serves_another_expert_set_of_the_same_bucket(bert, cache):
    exported = len(cache._mem)
    trainer, parity = training_parity(bert, [E(0, 3), E(0, 0), E(1, 2), E(1, 1)], 2, 8,
                                      steps=5, lr=0.5, cache=cache)
    assert len(cache._mem) == exported  # reused the bucket-4 program of the previous test
    _check_parity(parity)


def test_dropped_experts_program_is_smaller_and_matches_its_eager_twin(qwen, cache):
    selected = [E(0, 1), E(1, 2)]
    frozen, _ = training_parity(qwen, selected, 2, 8, steps=1, lr=0.5, cache=cache)
    trainer, parity = training_parity(qwen, selected, 2, 8, steps=5, lr=0.5, mode="dropped",
                                      cache=cache)
    _check_parity(parity)
    assert len(trainer.program.buffer) < len(frozen.program.buffer)
    # Tokens only reach kept experts, so the forward differs from the full model's.
    b = example_inputs(qwen, 2, 8, seed=3)
    fresh = ExecuTorchTrainer(qwen, selected, (2, 8), 0.1, mode="dropped", cache=cache)
    with torch.no_grad():
        full = qwen.module(**b).logits
    assert (fresh.logits(b) - full).abs().max() > 1e-4


def test_trainer_rejects_a_batch_of_another_shape(qwen, cache):
    trainer = ExecuTorchTrainer(qwen, [E(0, 1), E(1, 2)], (2, 8), 0.1, cache=cache)
    with pytest.raises(ExportError):
        trainer.step(example_inputs(qwen, 2, 9))


# --- the capacity expert path ------------------------------------------------------------------
# qwen3-moe tiny: E = 4 experts, k = 2, batches of 2 x 8 = 16 tokens per layer. Factor 1.0:
# 8 rows per expert (half the dense work), some pairs dropped. That nothing is dropped at
# factor E/k, where the path is the model's own, is checked on the eager path
# (tests/hfedmoe/test_experts.py); each export here costs about a minute.
def test_capacity_program_drops_pairs_like_its_eager_twin(qwen, cache, tmp_path):
    selected = [E(0, 1), E(1, 2)]
    trainer, parity = training_parity(qwen, selected, 2, 8, steps=5, lr=0.5, cache=cache,
                                      capacity_factor=1.0)
    _check_parity(parity)
    assert trainer.program.capacity_factor == 1.0 and trainer.bucket == 2
    assert len(parity.drops_eager) == 5 and all(routed == 2 * 16 * 2
                                                for _, routed in parity.drops_eager)
    assert all(dropped > 0 for dropped, _ in parity.drops_eager)
    assert 0 < parity.dropped_fraction < 0.5
    # the drops change the forward: it is not the model's
    b = example_inputs(qwen, 2, 8, seed=3)
    fresh = ExecuTorchTrainer(qwen, selected, (2, 8), 0.1, cache=cache, capacity_factor=1.0)
    with torch.no_grad():
        full = qwen.module(**b).logits
    assert (fresh.logits(b) - full).abs().max() > 1e-4
    # programs of other factors (or dense) have other keys; a saved program keeps its factor
    keys = {training_key(qwen, 2, 2, 8, capacity_factor=f) for f in (None, 1.0, 2.0, 1.25)}
    assert len(keys) == 4
    assert training_key(qwen, 2, 2, 8, capacity_factor=1) == trainer.program.key
    ProgramCache(tmp_path)._save(trainer.program)
    loaded = ProgramCache(tmp_path).get(qwen, 2, 2, 8, capacity_factor=1.0)  # no export
    assert loaded.capacity_factor == 1.0 and loaded.buffer == trainer.program.buffer


def test_capacity_factor_must_be_positive(qwen):
    with pytest.raises(ExportError, match="capacity_factor"):
        TrainingProgram(qwen, 2, capacity_factor=0.0)
    with pytest.raises(ExportError, match="capacity_factor"), export_mode(qwen,
                                                                         capacity_factor=-1.0):
        pass
    assert all(layer.bank.impl == "grouped" for layer in qwen.layers)


@pytest.mark.slow
def test_xnnpack_capacity_program_matches_eager_sgd(qwen):
    _, parity = training_parity(qwen, [E(0, 0), E(1, 3)], 2, 8, steps=5, lr=0.5,
                                backend="xnnpack", cache=ProgramCache(), capacity_factor=1.0)
    _check_parity(parity)
    assert all(dropped > 0 for dropped, _ in parity.drops_eager)


@pytest.mark.slow
def test_xnnpack_training_program_matches_eager_sgd(qwen):
    _, parity = training_parity(qwen, [E(0, 0), E(1, 3)], 2, 8, steps=5, lr=0.5,
                                backend="xnnpack", cache=ProgramCache())
    _check_parity(parity)


@pytest.mark.slow
def test_cli_exports_onnx_and_train_pte(tmp_path, capsys):
    from hfedmoe.cli import main

    assert main(["export", "onnx", "--model", "qwen3-moe-tiny", "--out", str(tmp_path),
                 "--batch", "2", "--seq", "8", "--num-labels", "3"]) == 0
    assert main(["export", "train-pte", "--model", "qwen3-moe-tiny", "--out", str(tmp_path),
                 "--experts", "0:1,1:3", "--batch", "2", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "parity losses" in out and "trainable params" in out
    assert list(tmp_path.glob("*.pte")) and list(tmp_path.glob("*.onnx"))

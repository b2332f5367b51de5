"""ExecuTorch training programs with LoRA slots (train.adapter = "lora" on the phone's runtime).

The LoRA program's trainable slots are factors (``slot_lora_A_in`` (bucket, r, d_model), ...),
placed into the selected experts by the same one-hot selection as the full-expert program; the
base expert weights are constants. Parity: 5 SGD steps in ExecuTorch against the kit's eager
LoRA (``EagerTrainer``, ``adapter="lora"``, ``optimizer="sgd"``) from the same factors: losses
(relative to max(1, |loss|)) and the sent values (factors, bias/gate/head deltas) within 1e-5.
"""

import math

import pytest
import torch

pytest.importorskip("executorch")

from export.common import example_inputs  # noqa: E402
from export.programs import (  # noqa: E402
    LoRATrainingProgram,
    _PlacedFactors,
    export_mode,
    flat_expert_index,
)
from export.runtime import ExecuTorchTrainer, ProgramCache  # noqa: E402
from export.training import TRAIN_TOL, lora_training_parity  # noqa: E402
from hfedmoe.errors import ExportError  # noqa: E402
from hfedmoe.lora import LORA_A, LORA_B, ExpertFactors, LoRASpec, expand, with_factors  # noqa: E402
from hfedmoe.models.hf import build_hf_model  # noqa: E402
from hfedmoe.names import ExpertId, expert_key, parse_key  # noqa: E402
from tests.export.test_export import tiny_bert_moe  # noqa: E402

E = ExpertId
LORA = LoRASpec(2, 4.0)


@pytest.fixture(scope="module")
def bert():
    return tiny_bert_moe()


@pytest.fixture(scope="module")
def qwen():
    return build_hf_model("qwen3-moe", "classification", num_labels=3)


@pytest.fixture(scope="module")
def cache():
    return ProgramCache()


def _check_parity(parity, steps=5):
    assert len(parity.losses_executorch) == steps
    for got, want in zip(parity.losses_executorch, parity.losses_eager, strict=True):
        assert abs(got - want) <= TRAIN_TOL * max(1.0, abs(want))
    assert set(parity.deltas_executorch) == set(parity.deltas_eager)
    for key, value in parity.deltas_executorch.items():
        torch.testing.assert_close(value, parity.deltas_eager[key], rtol=0, atol=TRAIN_TOL)


def test_lora_program_forward_is_the_model_with_factors(bert):
    """Placed factors give each selected expert x W^T + scale x A^T B^T; unselected experts
    and B = 0 give the model itself (no export: the module's own forward)."""
    selected = [E(0, 1), E(1, 3)]
    b = example_inputs(bert, 2, 8)
    gen = torch.Generator().manual_seed(0)
    with export_mode(bert, attn="eager"):
        prog = LoRATrainingProgram(bert, 2, LORA)
        assert {n: tuple(p.shape) for n, p in prog.named_parameters()
                if n.startswith("slot_")} == {
            "slot_lora_A_in": (2, 2, 32), "slot_lora_B_in": (2, 64, 2),
            "slot_lora_A_out": (2, 2, 64), "slot_lora_B_out": (2, 32, 2),
            "slot_b_in": (2, 64), "slot_b_out": (2, 32)}
        idx = flat_expert_index(bert, selected, 2)
        with torch.no_grad():
            for i, e in enumerate(selected):
                ex = bert.layer(e.layer_idx).bank.experts[e.expert_idx]
                prog.slot_b_in[i].copy_(ex.b_in)
                prog.slot_b_out[i].copy_(ex.b_out)
                prog.slot_lora_A_in[i].normal_(generator=gen)
                prog.slot_lora_A_out[i].normal_(generator=gen)
            base = bert.module(**b).logits
            _, at_zero = prog(b["input_ids"], b["attention_mask"], b["labels"], idx)
            torch.testing.assert_close(at_zero, base, rtol=0, atol=1e-6)  # B = 0: the model
            for name in ("slot_lora_B_in", "slot_lora_B_out"):
                getattr(prog, name).normal_(std=0.5, generator=gen)
            _, got = prog(b["input_ids"], b["attention_mask"], b["labels"], idx)
            for i, e in enumerate(selected):  # the same factors attached to the eager experts
                ex = bert.layer(e.layer_idx).bank.experts[e.expert_idx]
                ex.factors = _PlacedFactors(
                    {s: getattr(prog, n)[i] for n, s in prog.slots.items() if "lora" in n},
                    LORA.scale)
            try:
                want = bert.module(**b).logits
            finally:
                for e in selected:
                    bert.layer(e.layer_idx).bank.experts[e.expert_idx].factors = None
    assert (got - base).abs().max() > 1e-3  # the factors do change the forward
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_lora_program_matches_the_eager_lora_trainer(bert, cache):
    """BERT experts (GELU, biases): bucket 4 with 3 experts, one slot unused."""
    selected = [E(0, 1), E(1, 0), E(1, 3)]
    before = bert.state()
    trainer, parity = lora_training_parity(bert, selected, 2, 8, LORA, steps=5, lr=0.1,
                                           seed=7, cache=cache)
    _check_parity(parity)
    assert trainer.bucket == 4 and trainer.program.adapter == "lora"
    sent = trainer.deltas()
    factors = {f"{expert_key(e.layer_idx, e.expert_idx, w)}.{part}" for e in selected
               for w in ("w_in", "w_out") for part in (LORA_A, LORA_B)}
    biases = {expert_key(e.layer_idx, e.expert_idx, p) for e in selected for p in ("b_in", "b_out")}
    gates_and_head = {"layers.0.gate.weight", "layers.1.gate.weight",
                      "shared.classifier.weight", "shared.classifier.bias"}
    assert set(sent) == factors | biases | gates_and_head  # no dense w_in / w_out
    # the round started from ExpertFactors drawn as the eager trainer draws them ...
    gen = torch.Generator().manual_seed(7)
    for e in sorted(selected):
        ex = bert.layer(e.layer_idx).bank.experts[e.expert_idx]
        start = ExpertFactors(ex.w_in, ex.w_out, LORA, gen).factors
        for name, t in start.items():
            assert torch.equal(trainer.initial[f"{expert_key(e.layer_idx, e.expert_idx, name)}"],
                               t.detach())
            assert not torch.equal(sent[expert_key(e.layer_idx, e.expert_idx, name)], t)  # trained
    # ... and B from zero; the unused slot stays zero
    assert all(trainer.initial[k].abs().max() == 0 for k in factors if k.endswith(LORA_B))
    assert all(trainer.module.named_parameters()[n][3].abs().max() == 0
               for n in trainer.program.slots)
    assert all(torch.equal(bert.state()[k], before[k]) for k in before)  # model untouched


def test_lora_program_on_a_silu_model_trains_fewer_parameters(qwen, cache):
    """Qwen3-MoE experts (SwiGLU, x*sigmoid(x), no biases). The LoRA program trains far fewer
    parameters than the full-expert program of the same bucket (its file is not smaller on a
    model this tiny: every expert's factor path is in the graph; see docs/method.md)."""
    selected = [E(0, 1), E(1, 2)]
    trainer, parity = lora_training_parity(qwen, selected, 2, 8, LORA, steps=5, lr=0.5,
                                           seed=3, cache=cache)
    _check_parity(parity)
    assert set(trainer.program.slots) == {"slot_lora_A_in", "slot_lora_B_in",
                                          "slot_lora_A_out", "slot_lora_B_out"}
    shape = qwen.layers[0].bank.shape  # w_in (2 d_ff, d), w_out (d, d_ff)
    factors = LORA.rank * (2 * shape.d_ff + shape.d_model + shape.d_ff + shape.d_model)
    not_slots = trainer.program.trainable_params - 2 * factors  # gates and head
    assert trainer.program.bucket == 2 and not_slots == sum(
        p.numel() for k, p in qwen.state().items() if parse_key(k).kind != "expert")
    assert 2 * factors < 0.1 * 2 * shape.params_per_expert  # the full program's slots


def test_lora_program_on_the_capacity_path_matches_the_eager_lora_trainer(qwen, cache):
    """Capacity factor 1.0 (8 of 16 rows per expert): both drop the same pairs."""
    selected = [E(0, 1), E(1, 2)]
    trainer, parity = lora_training_parity(qwen, selected, 2, 8, LORA, steps=5, lr=0.5,
                                           seed=3, cache=cache, capacity_factor=1.0)
    _check_parity(parity)
    assert trainer.program.adapter == "lora" and trainer.program.capacity_factor == 1.0
    assert len(parity.drops_eager) == 5 and all(d > 0 for d, _ in parity.drops_eager)


def test_lora_program_rejects_what_it_does_not_do(qwen, cache):
    with pytest.raises(ExportError, match="frozen"):
        ExecuTorchTrainer(qwen, [E(0, 1)], (2, 8), 0.1, mode="dropped", lora=LORA, cache=cache)


@pytest.mark.slow
def test_executorch_lora_round_sends_factors_the_server_accepts(tokenizer):
    """train_round(runtime="executorch", adapter="lora"): only factor keys for experts, which
    the server's LoRA wire spec validates and ``expand`` turns into dense deltas; the same
    round on the eager runtime (same seed rule, SGD, one learning rate) sends the same update."""
    from device_agent.train import RoundContext, RoundIds, train_round
    from hfedmoe.aggregation import PLAIN_RULE
    from hfedmoe.aggregator import Aggregator
    from hfedmoe.config import TrainConfig
    from hfedmoe.strategies import get_strategy
    from hfedmoe.wire import decode, encode, spec_from_state
    from tests.device_agent.test_train import text_data, tiny

    model = tiny(tokenizer)
    before = model.state()
    cfg = TrainConfig(batch_size=4, lr=1e-2, head_lr=0.0, optimizer="sgd", adapter="lora",
                      lora_rank=LORA.rank, lora_alpha=LORA.alpha)

    def run(m, runtime):
        return train_round(RoundContext(
            m, text_data(), strategy=get_strategy("hfedmoe"), budget=2, train=cfg, max_length=16,
            runtime=runtime, ids=RoundIds(client_id="c1")))

    res = run(model, "executorch")
    assert res.steps == 3 and all(map(math.isfinite, res.losses))
    assert res.update.meta["runtime"] == "executorch" and res.update.meta["bucket"] == 2
    deltas = res.update.deltas
    expert_keys = [k for k in deltas if parse_key(k).kind == "expert"]
    assert expert_keys and all(k.rsplit(".", 1)[-1] in (LORA_A, LORA_B) for k in expert_keys)
    assert {parse_key(k).expert for k in expert_keys} == set(res.update.updated)
    assert 1 <= len(res.update.updated) <= 2
    assert any(deltas[k].abs().max() > 0 for k in expert_keys if k.endswith(LORA_B))
    # the device keeps its base expert weights; gates and the head trained
    after = model.state()
    assert all(torch.equal(before[k], after[k]) for k in before if parse_key(k).kind == "expert")
    assert any(not torch.equal(before[k], after[k]) for k in before
               if parse_key(k).kind != "expert")
    # the server: the LoRA wire spec validates it, expand gives dense deltas, aggregation runs
    spec = with_factors(spec_from_state(before), LORA)
    expanded = expand(decode(encode(res.update, 0.0), spec), LORA)
    for e in res.update.updated:
        for w in ("w_in", "w_out"):
            key = expert_key(e.layer_idx, e.expert_idx, w)
            want = LORA.scale * deltas[f"{key}.{LORA_B}"] @ deltas[f"{key}.{LORA_A}"]
            torch.testing.assert_close(expanded.deltas[key], want, rtol=1e-5, atol=1e-7)
    agg = Aggregator(PLAIN_RULE)
    agg.add(expanded)
    new = agg.finalize(before)
    moved = {parse_key(k).expert for k in before if parse_key(k).kind == "expert"
             and not torch.equal(new[k], before[k])}
    assert moved and moved <= set(res.update.updated)
    eager = run(tiny(tokenizer), "eager")
    assert eager.selected == res.selected and set(eager.update.deltas) == set(deltas)
    for got, want in zip(res.losses, eager.losses, strict=True):
        assert abs(got - want) <= 1e-5 * max(1.0, abs(want))
    for key, value in deltas.items():  # measured: 4e-9
        torch.testing.assert_close(value, eager.update.deltas[key], rtol=0, atol=1e-5)

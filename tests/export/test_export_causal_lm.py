"""ExecuTorch training programs of a causal MoE LM (``data.task = "causal-lm"``).

The program's loss is the eager trainer's: the model's own next-token cross-entropy, on the
positions whose label is not ``-100`` (the prompt and padding take none). Parity: 5 SGD steps
in ExecuTorch against the kit's eager LoRA (``EagerTrainer``, ``adapter="lora"``,
``optimizer="sgd"``) from the same factors: losses (relative to max(1, |loss|)) and the sent
values (factors, gate deltas) within 1e-5, the classifier programs' tolerance. The export
takes ~20-30 s on two cores, so the parity tests are ``slow``; the program's loss is checked
without an export in the default run.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("executorch")

from export.common import example_inputs  # noqa: E402
from export.executorch import load_training  # noqa: E402
from export.programs import LoRATrainingProgram, export_mode, flat_expert_index  # noqa: E402
from export.runtime import ProgramCache  # noqa: E402
from export.training import TRAIN_TOL, lora_training_parity  # noqa: E402
from hfedmoe.config import ModelConfig  # noqa: E402
from hfedmoe.data.tokenization import IGNORE_INDEX  # noqa: E402
from hfedmoe.lora import LORA_A, LORA_B, LoRASpec  # noqa: E402
from hfedmoe.models.registry import build_model  # noqa: E402
from hfedmoe.names import ExpertId, expert_key  # noqa: E402
from tests.export.test_export_lora import _check_parity  # noqa: E402

E = ExpertId
LORA = LoRASpec(2, 4.0)


def causal(name: str = "qwen3-moe-tiny"):
    return build_model(ModelConfig(name=name), "causal-lm")


@pytest.fixture(scope="module")
def qwen():
    return causal()


def _response_loss(logits, labels):
    """Next-token cross-entropy on the labelled positions, written out by hand."""
    pred, target = logits[:, :-1], labels[:, 1:]  # position t predicts token t + 1
    keep = target != IGNORE_INDEX
    return F.cross_entropy(pred[keep], target[keep])


def test_example_labels_hide_the_prompt_and_the_padding(qwen):
    b = example_inputs(qwen, 2, 8)
    labels, ids, mask = b["labels"], b["input_ids"], b["attention_mask"]
    assert labels.shape == ids.shape == (2, 8)
    assert (labels[:, :2] == IGNORE_INDEX).all()  # the prompt: a quarter of the row
    assert (labels[mask == 0] == IGNORE_INDEX).all() and (mask == 0).any()
    response = (labels != IGNORE_INDEX)
    assert response.any() and torch.equal(labels[response], ids[response])


def test_causal_lm_program_loss_is_the_response_only_next_token_loss(qwen):
    """No export: the program's forward. With B = 0 it is the model (logits and loss); with
    factors placed, its loss is the hand-written response-only loss of its logits, which
    differs from the loss over every token."""
    selected = [E(0, 1), E(1, 2)]
    b = example_inputs(qwen, 2, 8, seed=4)
    args = (b["input_ids"], b["attention_mask"], b["labels"])
    gen = torch.Generator().manual_seed(0)
    with export_mode(qwen, attn="eager"):
        prog = LoRATrainingProgram(qwen, 2, LORA)
        idx = flat_expert_index(qwen, selected, 2)
        with torch.no_grad():
            want = qwen.module(**b)
            loss0, logits0 = prog(*args, idx)
            torch.testing.assert_close(logits0, want.logits, rtol=0, atol=1e-6)
            torch.testing.assert_close(loss0, want.loss, rtol=0, atol=1e-6)
            for name in prog.slots:
                getattr(prog, name).normal_(std=0.5, generator=gen)
            loss, logits = prog(*args, idx)
    assert (logits - logits0).abs().max() > 1e-3  # the factors change the forward
    torch.testing.assert_close(loss, _response_loss(logits, b["labels"]), rtol=0, atol=1e-6)
    every_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                  b["input_ids"][:, 1:].reshape(-1))
    assert (loss - every_token).abs() > 1e-3


@pytest.mark.slow
def test_causal_lm_lora_program_matches_the_eager_lora_trainer(qwen):
    """Qwen3-MoE causal LM: bucket 4 with 3 experts (one slot unused), 5 SGD steps."""
    selected = [E(0, 1), E(1, 0), E(1, 3)]
    before = qwen.state()
    trainer, parity = lora_training_parity(qwen, selected, 2, 8, LORA, steps=5, lr=0.5,
                                           seed=3, cache=ProgramCache())
    _check_parity(parity)
    assert trainer.bucket == 4 and trainer.program.adapter == "lora"
    factors = {f"{expert_key(e.layer_idx, e.expert_idx, w)}.{part}" for e in selected
               for w in ("w_in", "w_out") for part in (LORA_A, LORA_B)}
    assert set(parity.deltas_executorch) == factors | {"layers.0.gate.weight",
                                                       "layers.1.gate.weight"}
    assert all(parity.deltas_executorch[k].abs().max() > 0 for k in factors
               if k.endswith(LORA_B))  # B trained from zero
    assert parity.losses_executorch[0] != parity.losses_executorch[-1]
    assert all(torch.equal(qwen.state()[k], before[k]) for k in before)  # model untouched


@pytest.mark.slow
def test_causal_lm_lora_program_of_another_family_matches_eager():
    """OLMoE (its own router and attention, q/k norms): the same parity."""
    _, parity = lora_training_parity(causal("olmoe-tiny"), [E(0, 2), E(1, 1)], 2, 8, LORA,
                                     steps=5, lr=0.5, seed=1, cache=ProgramCache())
    _check_parity(parity)


@pytest.mark.slow
def test_cli_exports_a_causal_lm_training_program_that_runs(tmp_path, capsys):
    """``hfedmoe export train-pte --task causal-lm``: LoRA by default (train.adapter "auto"),
    parity within tolerance, and the written .pte runs in ExecuTorch's training runtime, its
    first loss the model's own on that batch (the factors start at zero in the file)."""
    from hfedmoe.cli import main

    argv = ["export", "train-pte", "--model", "qwen3-moe-tiny", "--task", "causal-lm",
            "--out", str(tmp_path), "--experts", "0:1,1:3", "--batch", "2", "--seq", "8",
            "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["info"]["adapter"] == "lora r=8 alpha=16.0"
    assert set(report["parity"]) == {"losses", "updates", "key sets"}
    assert max(report["parity"].values()) <= TRAIN_TOL
    losses = [[float(v) for v in report["info"][k].split()] for k in ("losses (et)",
                                                                      "losses (eager)")]
    assert len(losses[0]) == 5 and losses[0] == pytest.approx(losses[1], abs=1e-4)

    program = Path(report["path"]).read_bytes()
    module = load_training(program)
    model = causal()  # the same seed: the CLI's model
    b = example_inputs(model, 2, 8, seed=21)
    idx = flat_expert_index(model, [E(0, 1), E(1, 3)], 2)
    out = module.forward_backward("forward", (b["input_ids"], b["attention_mask"],
                                              b["labels"], idx))
    with torch.no_grad():
        want = model.module(**b).loss
    assert float(out[0]) == pytest.approx(float(want), abs=1e-5)
    assert out[1].shape == (2, 8, 259)  # logits over the byte tokenizer's vocabulary

    assert main(argv[:-1] + ["--lora-rank", "0"]) == 0  # the full-expert program too
    out = capsys.readouterr().out
    assert "adapter            full" in out and "FAIL" not in out


@pytest.mark.slow
def test_executorch_causal_lm_round_sends_what_the_eager_round_sends():
    """``train_round(runtime="executorch")`` on a causal LM with LoRA: the round trains through
    the causal-LM program (batches padded to its static shape) and sends the eager round's
    update (same selection, losses and factors within the parity tolerance)."""
    from device_agent.train import RoundContext, RoundIds, train_round
    from hfedmoe.config import TrainConfig
    from hfedmoe.data import PairDataset
    from hfedmoe.strategies import get_strategy

    data = PairDataset(("hi there", "what is up", "reset router", "who wrote hamlet", "a poem",
                        "rules of cricket"),
                       ("hello", "not much", "unplug it", "shakespeare", "the sea",
                        "bat and ball"), (0,) * 6, ("all",))
    cfg = TrainConfig(batch_size=2, lr=1e-1, head_lr=0.0, optimizer="sgd", adapter="lora",
                      lora_rank=LORA.rank, lora_alpha=LORA.alpha)

    def run(runtime):
        return train_round(RoundContext(
            causal(), data, strategy=get_strategy("hfedmoe"), budget=2, train=cfg,
            max_length=24, runtime=runtime, ids=RoundIds(client_id="c1")))

    res, eager = run("executorch"), run("eager")
    assert res.steps == 3 and res.update.meta["runtime"] == "executorch"
    assert res.selected == eager.selected and set(res.update.deltas) == set(eager.update.deltas)
    assert any(k.endswith(LORA_B) for k in res.update.deltas)
    for got, want in zip(res.losses, eager.losses, strict=True):
        assert abs(got - want) <= TRAIN_TOL * max(1.0, abs(want))
    for key, value in res.update.deltas.items():  # measured: 2e-9
        torch.testing.assert_close(value, eager.update.deltas[key], rtol=0, atol=TRAIN_TOL)

"""The local recipe: only selected experts train, budgets and deadlines hold, updates are sparse."""

import dataclasses
import itertools
import math

import pytest
import torch

from device_agent.train import RoundContext, RoundIds, train_round
from hfedmoe.config import MethodConfig, TrainConfig
from hfedmoe.data import PairDataset, TextDataset
from hfedmoe.errors import ConfigError
from hfedmoe.models.hf import build_hf_model
from hfedmoe.names import parse_key
from hfedmoe.strategies import get_strategy
from hfedmoe.trainer import EagerTrainer, StopTraining, make_optimizer

TEXTS = ["how do I reset my router", "what is a neural network", "tell me about football",
         "who wrote hamlet", "my laptop will not start", "explain gradient descent",
         "best goalkeeper ever", "a poem about the sea", "the wifi keeps dropping",
         "what is backpropagation", "rules of cricket", "who is the author of dune"]


def tiny(tokenizer, task="classification"):
    model = build_hf_model("qwen3-moe", task, num_labels=3, vocab_size=tokenizer.vocab_size)
    model.tokenizer = tokenizer
    return model


def text_data():
    return TextDataset(tuple(TEXTS), tuple(i % 3 for i in range(len(TEXTS))),
                       ("tech", "science", "culture"))


@pytest.mark.parametrize("strategy", ["hfedmoe", "hfedmoe-importance", "fedavg-random"])
def test_only_selected_experts_change_and_budget_holds(tokenizer, strategy):
    model = tiny(tokenizer)
    before = model.state()
    res = train_round(RoundContext(
        model, text_data(), strategy=get_strategy(strategy), budget=2,
        train=TrainConfig(batch_size=4, lr=1e-2), ids=RoundIds(client_id="c1")))
    assert res.steps == 3 and res.stopped_by == "data"
    assert all(len(sel) <= 2 for sel in res.selections)
    after = model.state()
    changed = {parse_key(k).expert for k in before
               if parse_key(k).kind == "expert" and not torch.equal(before[k], after[k])}
    # nothing outside the union of E_active moved (an active expert whose tokens do not reach
    # the loss, e.g. non-final tokens in the last layer, may get an exactly-zero gradient)
    assert changed <= set(res.update.updated) and len(changed) >= 1
    sent = {parse_key(k).expert for k in res.update.deltas if parse_key(k).kind == "expert"}
    assert sent == set(res.update.updated)
    for key, delta in res.update.deltas.items():
        torch.testing.assert_close(before[key] + delta, after[key])
    assert res.update.updated <= res.update.routed
    usage_total = sum(u for e, u in res.update.usage.items() if e.layer_idx == 0)
    assert usage_total == pytest.approx(1.0, abs=1e-5)  # u_c(e) sums to 1 over a layer


def test_fedavg_full_trains_every_routed_expert(tokenizer):
    model = tiny(tokenizer)
    res = train_round(RoundContext(
        model, text_data(), strategy=get_strategy("fedavg-full"), budget=1,
        train=TrainConfig(batch_size=6, lr=1e-2)))
    assert len(res.update.updated) == 8  # 2 layers x 4 experts, budget ignored


def test_deadline_stops_before_the_step_that_would_overrun(tokenizer):
    ticks = itertools.count()
    res = train_round(RoundContext(
        tiny(tokenizer), text_data(), strategy=get_strategy("hfedmoe"), budget=2,
        train=TrainConfig(batch_size=2), deadline_s=2.5, clock=lambda: float(next(ticks))))
    # each step reads the clock 3 times (1 s apart); the third step would end past 2.5 s
    assert res.stopped_by == "deadline" and res.steps == 1


def test_causal_lm_round_sends_sparse_update(tokenizer):
    data = PairDataset(("hi there", "what is up", "reset router"),
                       ("hello", "not much", "unplug it"), (0, 0, 0), ("all",))
    model = tiny(tokenizer, "causal-lm")
    res = train_round(RoundContext(
        model, data, strategy=get_strategy("hfedmoe"), budget=1,
        train=TrainConfig(batch_size=3, lr=1e-2, optimizer="sgd")))
    assert res.steps == 1 and len(res.update.updated) == 1
    kinds = {parse_key(k).kind for k in res.update.deltas}
    assert kinds == {"expert", "gate"}  # causal-LM has no shared head


def test_dp_clips_the_update(tokenizer):
    cfg = MethodConfig(dp_clip=1e-3, dp_noise_multiplier=0.0)
    res = train_round(RoundContext(
        tiny(tokenizer), text_data(), strategy=get_strategy("hfedmoe", cfg), budget=2,
        train=TrainConfig(batch_size=4, lr=1e-1)))
    norm = sum(float(d.pow(2).sum()) for d in res.update.deltas.values()) ** 0.5
    assert norm == pytest.approx(1e-3, rel=1e-4)
    # the pre-clip norm and the clip factor never leave the device
    assert not {"dp_norm", "dp_scale"} & set(res.update.meta)


def test_server_cannot_recover_the_dp_noise(tokenizer):
    """The noise comes from the OS: knowing every setting of the run (seeds, client id, round)
    does not reproduce it, so subtracting a regenerated noise does not reveal the delta."""
    from device_agent.train import train_round as run
    from hfedmoe.selection import selection_generator

    cfg = MethodConfig(dp_clip=1e-3, dp_noise_multiplier=50.0, seed=7)
    ids = RoundIds(client_id="dev1", round_idx=3)
    clean = run(RoundContext(
        tiny(tokenizer), text_data(),
        strategy=get_strategy("hfedmoe", MethodConfig(dp_clip=1e-3, seed=7)), budget=2,
        train=TrainConfig(batch_size=4, max_steps=2), ids=ids)).update.deltas  # clipped, no noise
    noisy = [run(RoundContext(
        tiny(tokenizer), text_data(), strategy=get_strategy("hfedmoe", cfg), budget=2,
        train=TrainConfig(batch_size=4, max_steps=2), ids=ids)).update for _ in range(2)]
    assert noisy[0].meta["dp_noise_std"] == pytest.approx(0.05)
    keys = sorted(clean)
    assert keys == sorted(noisy[0].deltas) == sorted(noisy[1].deltas)
    # the same device, data and settings twice: different noise
    assert any(not torch.equal(noisy[0].deltas[k], noisy[1].deltas[k]) for k in keys)
    # the attack that worked when noise was seeded from the server's settings
    gen = selection_generator(cfg.seed + 1, "dev1", 3)
    worst = 0.0
    for k in keys:
        guess = torch.randn(noisy[0].deltas[k].shape, generator=gen) * 0.05
        worst = max(worst, float((noisy[0].deltas[k] - guess - clean[k]).abs().max()))
    assert worst > 0.05  # the residual is noise-sized, not ~1e-9


def test_bf16_autocast_trains(tokenizer):
    res = train_round(RoundContext(
        tiny(tokenizer), text_data(), strategy=get_strategy("hfedmoe"), budget=2,
        train=TrainConfig(batch_size=4, dtype="bfloat16", max_steps=2)))
    assert res.steps == 2 and res.stopped_by == "max_steps"
    assert all(d.dtype == torch.float32 for d in res.update.deltas.values())


@pytest.mark.slow
def test_executorch_runtime_sends_the_same_update_format(tokenizer):
    pytest.importorskip("executorch")
    model = tiny(tokenizer)
    before = model.state()
    res = train_round(RoundContext(
        model, text_data(), strategy=get_strategy("hfedmoe"), budget=3,
        train=TrainConfig(batch_size=4, lr=1e-2), max_length=16, runtime="executorch"))
    assert res.steps == 3 and all(map(math.isfinite, res.losses))
    assert res.update.meta["bucket"] == 2 and len(res.update.updated) <= 2
    sent = {parse_key(k).expert for k in res.update.deltas if parse_key(k).kind == "expert"}
    assert sent == set(res.update.updated)
    after = model.state()
    for key in before:  # experts outside the update are bit-identical
        if key not in res.update.deltas:
            assert torch.equal(before[key], after[key]), key


class FakeProgram(EagerTrainer):
    """Stands in for :class:`export.runtime.ExecuTorchTrainer` (whose export takes about a
    minute): the program's constructor and static batch shape, eager SGD inside."""

    seen: list[dict] = []

    def __init__(self, model, experts, batch_shape, lr, **kwargs):
        FakeProgram.seen.append(kwargs)
        super().__init__(model, experts, TrainConfig(optimizer="sgd", lr=lr), MethodConfig())
        self.batch_shape = batch_shape

    def step(self, batch):
        assert tuple(batch["input_ids"].shape) == self.batch_shape  # padded to the program
        return super().step(batch)


@pytest.fixture
def fake_program(monkeypatch):
    import device_agent.train

    FakeProgram.seen = []
    monkeypatch.setattr(device_agent.train, "ExecuTorchTrainer", FakeProgram)
    return FakeProgram.seen


@pytest.mark.parametrize("factor", [None, 1.5])
def test_executorch_runtime_passes_the_capacity_factor_on(tokenizer, fake_program, factor):
    """train.executorch_capacity_factor reaches the ExecuTorch trainer (None: dense) and the
    update's metadata (only when set)."""
    res = train_round(RoundContext(
        tiny(tokenizer), text_data(), strategy=get_strategy("hfedmoe"), budget=3,
        train=TrainConfig(batch_size=4, executorch_capacity_factor=factor), max_length=16,
        runtime="executorch"))
    assert len(fake_program) == 1 and fake_program[0]["capacity_factor"] == factor
    assert fake_program[0]["bucket"] == 2 and fake_program[0]["write_back"] is True
    assert res.steps > 0 and res.update.meta.get("capacity_factor") == factor


@dataclasses.dataclass(frozen=True)
class OnePlan:
    experts: tuple
    steps: int

    def to_dict(self):
        return {"experts": len(self.experts), "steps": self.steps}


def _stop_at(step):
    def on_step(facts):
        if facts["step"] == step:
            raise StopTraining
    return on_step


# how a round ends -> what the context says (12 examples, batch 4: 3 steps of data)
STOPS = {
    "data": {},
    "max_steps": {"train": TrainConfig(batch_size=4, lr=1e-2, max_steps=2)},
    "plan": {"planner": lambda sel, stats: OnePlan(tuple(sel.ranked())[:1], 1)},
    "deadline": {"deadline_s": 2.5},  # a clock 1 s per read: the second step would overrun
    "conditions": {"on_step": _stop_at(2)},
}


def stop_summaries(model, runtime):
    """Per way a round ends: what the round reports, the same fields from every runtime."""
    initial = model.state()
    out = {}
    for name, given in STOPS.items():
        model.load_state(initial)
        ticks = itertools.count()
        ctx = RoundContext(model, text_data(), strategy=get_strategy("hfedmoe"), budget=2,
                           train=TrainConfig(batch_size=4, lr=1e-2), max_length=16,
                           runtime=runtime, clock=lambda t=ticks: float(next(t)))
        res = train_round(dataclasses.replace(ctx, **given))
        meta = res.update.meta
        assert set(res.update.updated) <= set(res.selected)
        assert res.optimizer_experts <= len(res.selected) and all(map(math.isfinite, res.losses))
        out[name] = {"stopped_by": res.stopped_by, "steps": res.steps, "examples": res.examples,
                     "tokens": res.tokens, "selections": len(res.selections),
                     "selected": len(res.selected), "budget": res.budget, "plan": res.plan,
                     "meta": sorted(set(meta) - {"reselect", "frozen_dtype", "bucket"}),
                     "meta_steps": (meta["steps"], meta["latency"]["steps"], meta["stopped_by"])}
    return out


def test_eager_and_executorch_runtimes_share_the_loop(tokenizer, fake_program):
    """Both runtimes run one loop: the same stop reasons, steps, examples, tokens and fields
    (the program's trainer stood in for; the real program: the slow test below)."""
    eager = stop_summaries(tiny(tokenizer), "eager")
    executorch = stop_summaries(tiny(tokenizer), "executorch")
    assert {k: v["stopped_by"] for k, v in eager.items()} == {k: k for k in STOPS}
    assert [v["steps"] for v in eager.values()] == [3, 2, 1, 1, 2]
    assert executorch == eager


def test_a_context_names_a_known_runtime(tokenizer):
    with pytest.raises(ConfigError, match="runtime"):
        RoundContext(tiny(tokenizer), text_data(), strategy=get_strategy("hfedmoe"), budget=2,
                     train=TrainConfig(), runtime="onnx")


@pytest.mark.slow
def test_the_executorch_program_runs_the_eager_loop(tokenizer):
    """The real ExecuTorch trainer (one tiny export, reused by every case) ends its rounds
    for the same reasons and reports the same fields as the eager one."""
    pytest.importorskip("executorch")
    model = tiny(tokenizer)
    assert stop_summaries(model, "executorch") == stop_summaries(model, "eager")


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_is_fused_on_cpu_and_skips_params_without_grad(name):
    torch.manual_seed(0)
    params = {"a": torch.nn.Parameter(torch.randn(4, 3)), "b": torch.nn.Parameter(torch.randn(5))}
    before = {k: p.detach().clone() for k, p in params.items()}
    opt = make_optimizer(params, TrainConfig(optimizer=name, lr=0.1, weight_decay=0.01))
    params["a"].grad = torch.ones(4, 3)
    opt.step()

    assert opt.defaults["fused"] is True
    assert not torch.equal(params["a"], before["a"])
    assert torch.equal(params["b"], before["b"]) and params["b"] not in opt.state


def test_head_gets_its_own_learning_rate():
    params = {"layers.0.experts.0.w_in": torch.nn.Parameter(torch.zeros(2, 2)),
              "layers.0.gate.weight": torch.nn.Parameter(torch.zeros(2, 2)),
              "shared.classifier.weight": torch.nn.Parameter(torch.zeros(3, 2))}
    opt = make_optimizer(params, TrainConfig(lr=1e-4, head_lr=1e-2))
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(params["shared.classifier.weight"])] == 1e-2
    assert lrs[id(params["layers.0.experts.0.w_in"])] == lrs[id(params["layers.0.gate.weight"])] \
        == 1e-4
    same = make_optimizer(params, TrainConfig(lr=1e-4, head_lr=0))  # 0: the head uses train.lr
    assert {g["lr"] for g in same.param_groups} == {1e-4}
    default = make_optimizer(params, TrainConfig(lr=1e-4))  # the kit's default head rate
    assert {g["lr"] for g in default.param_groups} == {1e-4, TrainConfig().head_lr}

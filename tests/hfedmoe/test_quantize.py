"""model.quantize: a device's frozen base stored weight-only int8/int4 with torchao, LoRA
training over it, and the fp32 server untouched.

Measured errors these tolerances are set from (tiny qwen3/qwen2/switch models, seeds 0-2, the
recipe texts): relative L2 error of the logits 0.12-1.3% for int8 and 3.2-23% for int4; one
linear layer on random inputs 0.4-0.8% (int8) and 6-8% (int4); the default model (MiniLM-MoE,
64 held-out texts): logits 8% (int8) and 26% (int4), pooled-embedding cosine mean 0.996,
min 0.983 (int8) and 0.949, min 0.91 (int4). Expert paths over a quantized base vs the same
weights in fp32: 3e-7 (int8) and 5e-3 (int4, bf16 activations in its kernel).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from device_agent.train import RoundContext, RoundIds, train_round
from hfedmoe.config import KitConfig, ModelConfig, TrainConfig, from_dict, load_config
from hfedmoe.data import collate
from hfedmoe.errors import ConfigError
from hfedmoe.experts import EXPERT_IMPLS, ExpertBank, ExpertShape
from hfedmoe.lora import LORA_A, LORA_B, ExpertFactors, LoRASpec, expand, with_factors
from hfedmoe.models.quantize import quantize_model, quantized_keys
from hfedmoe.names import parse_key
from hfedmoe.quantize import (
    QuantizedLinear,
    dequantize_weight,
    frozen_linear,
    is_quantized,
    quantize_weight,
    weight_bytes,
    weight_mode,
)
from hfedmoe.strategies import get_strategy
from hfedmoe.wire import decode, encode, spec_from_state
from tests.device_agent.test_train import text_data, tiny

LORA_CFG = TrainConfig(batch_size=2, lr=1e-2, adapter="lora", lora_rank=2, lora_alpha=4.0)
# relative L2 error of a model's logits, quantized vs fp32 (measured: see the module doc)
LOGIT_TOL = {"int8": 0.03, "int4": 0.3}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.module(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits


# --- config -------------------------------------------------------------------------------------


def test_bad_values_and_full_fine_tuning_are_rejected():
    with pytest.raises(ConfigError, match="model.quantize"):
        ModelConfig(quantize="int3")
    with pytest.raises(ConfigError, match="quantize"):
        from_dict(ModelConfig, {"quantize": "fp8"})
    with pytest.raises(ConfigError, match="train.adapter"):
        KitConfig(model=ModelConfig(quantize="int8"))  # adapter "full" would train the base
    from server.config import ServerConfig

    with pytest.raises(ConfigError, match="lora"):
        load_config(ServerConfig, overrides=["model.quantize=int4"])
    cfg = load_config(ServerConfig, overrides=["model.quantize=int8", "train.adapter=lora"])
    assert cfg.model.quantize == "int8" and ModelConfig().quantize == "none"
    with pytest.raises(ConfigError):
        quantize_weight(torch.randn(16, 32), "int2")


def test_a_round_announced_with_full_fine_tuning_is_refused_on_a_quantized_device(tokenizer):
    model = tiny(tokenizer)
    quantize_model(model, "int8")
    with pytest.raises(ConfigError, match="train.adapter"):
        train_round(RoundContext(
            model, text_data(), strategy=get_strategy("hfedmoe"), budget=2,
            train=TrainConfig(batch_size=2), ids=RoundIds(client_id="c1")))
    with pytest.raises(ConfigError, match="eager"):  # ExecuTorch exports from fp32 weights
        train_round(RoundContext(
            model, text_data(), strategy=get_strategy("hfedmoe"), budget=2, train=LORA_CFG,
            runtime="executorch", ids=RoundIds(client_id="c1")))


# --- what is quantized --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_only_the_frozen_base_is_quantized(tokenizer, mode):
    model = tiny(tokenizer)
    before = model.state()
    report = quantize_model(model, mode)
    assert report.experts == 2 * 4 * 2 and report.linears > 0
    assert report.bytes_after < report.bytes_before
    for key in model.keys():
        p, pk = model.parameter(key), parse_key(key)
        if pk.kind == "expert" and pk.param in ("w_in", "w_out"):
            assert is_quantized(p) and not p.requires_grad
            assert weight_mode(p) in (("int8",) if mode == "int8" else ("int4", "int8"))
        else:  # gates, the head, biases: fp32 parameters, exactly as they were
            assert type(p) is nn.Parameter and p.dtype == torch.float32, key
            assert torch.equal(p.detach(), before[key]), key
    if mode == "int4":  # w_in (96, 32) packs into int4; w_out (32, 48) does not (48 % 32)
        assert weight_mode(model.parameter("layers.0.experts.0.w_in")) == "int4"
        assert "layers.0.experts.0.w_out" in report.int8_fallback
    # what trains still trains: gates and the head require grad, the quantized base never
    model.set_trainable(model.expert_ids()[:2])
    trainable = model.trainable_parameters()
    assert trainable and all(type(p) is nn.Parameter for p in trainable.values())
    assert {parse_key(k).kind for k in trainable} >= {"gate", "shared"}
    assert not any(is_quantized(p) for p in trainable.values())
    # the rest of the network: every plain nn.Linear left is a federated one (gate or head)
    federated = {id(model.parameter(k)) for k in model.keys()}
    for name, mod in model.module.named_modules():
        if type(mod) is nn.Linear:
            assert id(mod.weight) in federated, name
        if isinstance(mod, QuantizedLinear) and mod.bias is not None:
            assert type(mod.bias) is nn.Parameter and mod.bias.dtype == torch.float32
    assert isinstance(model.module.backbone.embed_tokens, nn.Embedding)
    assert quantize_model(model, mode).experts == 0  # idempotent


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_forward_is_close_to_fp32(tokenizer, mode):
    model = tiny(tokenizer)
    data = text_data()
    batch = collate(data, list(range(len(data))), tokenizer, 64)
    ref = logits(model, batch)
    quantize_model(model, mode)
    err = rel(logits(model, batch), ref)
    assert 0 < err < LOGIT_TOL[mode], err
    torch.manual_seed(0)
    w, x = torch.randn(64, 128) * 0.05, torch.randn(40, 128)
    layer_err = rel(frozen_linear(x, quantize_weight(w, mode)), F.linear(x, w))
    assert layer_err < {"int8": 0.01, "int4": 0.1}[mode], layer_err


# --- training through a quantized weight --------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_frozen_linear_backpropagates_to_its_input_without_a_float_copy(mode):
    torch.manual_seed(0)
    q = quantize_weight(torch.randn(64, 128) * 0.05, mode)
    x = torch.randn(20, 128, requires_grad=True)
    b = torch.zeros(64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = frozen_linear(x, q, b)
    gy = torch.randn_like(y)
    y.backward(gy)
    w = dequantize_weight(q)
    # int4's kernel takes bf16 activations (hfedmoe.quantize): bf16 rounding of x, < 1%
    assert rel(y.detach(), F.linear(x.detach(), w, b.detach())) < (1e-5 if mode == "int8"
                                                                   else 1e-2)
    assert_close(x.grad, gy @ w, rtol=1e-5, atol=1e-6)  # the backward: exactly grad_y @ W
    assert_close(b.grad, gy.sum(0))
    assert not saved  # the graph keeps no (dequantized) weight until the backward
    if mode == "int8":  # why the Function: torchao's own F.linear keeps an fp32 weight copy
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t):
            F.linear(x, q)
        assert sum(t.numel() * t.element_size() for t in saved) >= 64 * 128 * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert frozen_linear(x, q).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["int8", "int4", "int4-probes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_backward_dequantizes_a_bounded_slice_at_a_time(mode, dtype, monkeypatch):
    """The input gradient through a frozen quantized weight is ``grad @ W`` whether the weight
    is dequantized whole or a slice at a time, and with a small slice budget no step of the
    backward materializes more of the weight than the budget (int4 unpacked: one block of
    rows at least): a real LM head (50k x 2048) would otherwise hold its float32 copy and
    casts, about 800 MB, in every step. ``int4-probes``: a pack this module cannot read, whose
    columns come from the kernel on rows of the identity."""
    import hfedmoe.quantize as quantize

    torch.manual_seed(0)
    q = quantize_weight(torch.randn(256, 128) * 0.05, mode[:4])
    grad = torch.randn(3, 5, 256).to(dtype)  # (batch, seq, out): the shape a layer sees
    whole = grad @ dequantize_weight(q).to(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    assert_close(quantize.grad_input(grad, q), whole, **tol)  # the default budget
    if mode == "int4-probes":
        monkeypatch.setattr(quantize, "_INT4_BLOCK_ROWS", {})
    monkeypatch.setattr(quantize, "DEQUANT_SLICE_BYTES", 4096)
    slices = []
    real_linear, real_rows, real_dequantize = F.linear, quantize._int4_rows, dequantize_weight

    def linear(x, w, *args):
        if is_quantized(w):
            slices.append(x.shape[0] * w.shape[0])  # probes: rows x out = the slice
        return real_linear(x, w, *args)

    def rows(w, r0, r1):
        out = real_rows(w, r0, r1)
        slices.append(out.numel())
        return out

    def dequantize(w):
        slices.append(w.numel())  # int8: the rows dequantized at once
        return real_dequantize(w)

    monkeypatch.setattr(quantize.F, "linear", linear)
    monkeypatch.setattr(quantize, "_int4_rows", rows)
    monkeypatch.setattr(quantize, "dequantize_weight", dequantize)
    sliced = quantize.grad_input(grad, q)
    assert sliced.shape == (3, 5, 128) and sliced.dtype == dtype
    assert_close(sliced, whole, **tol)
    item = max(torch.empty(0, dtype=dtype).element_size(), 2)
    per_slice = 4096 // item
    block = quantize._INT4_BLOCK_ROWS.get(torch.backends.cpu.get_cpu_capability())
    if mode == "int4" and block:  # unpacked: whole blocks of rows
        per_slice = max(per_slice, block * 128)
        slices = slices[1:]  # the call that finds the pack readable: one block
    assert len(slices) == 256 * 128 // per_slice  # the weight, in slices of the budget
    assert max(slices) <= per_slice


@pytest.mark.parametrize("rows", [256, 48])
def test_an_int4_weight_is_unpacked_to_what_the_kernel_computes_with(rows):
    """The int4 weight unpacked from the CPU pack equals the kernel's own output on the
    identity (the values it multiplies with), for every row and column; a weight whose rows
    do not fill the pack's blocks is read through the kernel instead, to the same values."""
    import hfedmoe.quantize as quantize

    torch.manual_seed(1)
    q = quantize_weight(torch.randn(rows, 256) * 0.05, "int4")
    assert quantize.weight_mode(q) == "int4"
    eye = torch.eye(256, dtype=torch.bfloat16)
    kernel = F.linear(eye, q).t().float()  # (out, in) through the kernel
    assert torch.equal(dequantize_weight(q), kernel)
    block = quantize._INT4_BLOCK_ROWS.get(torch.backends.cpu.get_cpu_capability())
    unpacked = quantize._int4_rows(q, 0, rows)
    if block and rows % block == 0:
        assert unpacked is not None and unpacked.dtype == torch.bfloat16  # the kernel's output
        assert torch.equal(unpacked.float(), kernel)
        assert torch.equal(quantize._int4_rows(q, block, 2 * block).float(),
                           kernel[block:2 * block])
    else:
        assert unpacked is None


def _bank(mode: str, quantized: bool, impl: str
          ) -> tuple[ExpertBank, dict[str, torch.Tensor]]:
    """A bank whose frozen base is quantized, or holds the same weights dequantized in fp32,
    with biases training and LoRA factors on expert 0."""
    torch.manual_seed(0)
    bank = ExpertBank(ExpertShape(32, 64, "silu", gated=True, bias=True), 3, impl)
    with torch.no_grad():
        for e in bank.experts:
            for p in e.parameters():
                p.normal_(std=0.2)
    factors = {}
    for i, e in enumerate(bank.experts):
        for name in ("w_in", "w_out"):
            q = quantize_weight(getattr(e, name), mode)
            w = q if quantized else dequantize_weight(q)
            setattr(e, name, nn.Parameter(w, requires_grad=False))
        e.b_in.requires_grad_(True)
        e.b_out.requires_grad_(True)
        if i == 0:
            e.factors = ExpertFactors(e.w_in, e.w_out, LoRASpec(2, 4.0),
                                      torch.Generator().manual_seed(1))
            with torch.no_grad():
                for t in e.factors.factors.values():
                    t.normal_(std=0.1)
            factors = e.factors.factors
    return bank, factors


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("impl", sorted(EXPERT_IMPLS))
def test_every_expert_path_trains_over_a_quantized_base(impl, mode):
    """Outputs and the gradients of the input, the biases and the LoRA factors through a
    quantized expert equal those through the same weights held in fp32 (int4: up to the bf16
    rounding of its kernel's activations)."""
    runs = []
    for quantized in (True, False):
        bank, factors = _bank(mode, quantized, impl)
        torch.manual_seed(2)
        x = torch.randn(15, 32, requires_grad=True)
        idx = torch.stack([torch.arange(15) % 3, (torch.arange(15) + 1) % 3], 1)
        y = bank(x, idx, torch.rand(15, 2))
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads = {n: p.grad for n, p in bank.named_parameters() if p.grad is not None}
        grads.update({n: t.grad for n, t in factors.items()})
        assert not any(is_quantized(p) and p.grad is not None for p in bank.parameters())
        runs.append((y.detach(), x.grad, grads))
    (yq, gq, wq), (yf, gf, wf) = runs
    tol = 1e-5 if mode == "int8" or impl == "grouped" else 2e-2  # grouped: fp32 dequantized
    assert rel(yq, yf) < tol and rel(gq, gf) < tol
    assert set(wq) == set(wf) and len(wq) == 3 * 2 + 4  # biases of 3 experts, 4 factors
    for n in wq:
        assert rel(wq[n], wf[n]) < tol, n


def test_lora_round_over_an_int8_base_sends_what_an_fp32_device_sends(tokenizer):
    results, models = {}, {}
    for mode in ("none", "int8"):
        model = tiny(tokenizer)
        quantize_model(model, mode)
        base = {k: dequantize_weight(model.parameter(k)).clone() for k in model.keys()}
        res = train_round(RoundContext(
            model, text_data(), strategy=get_strategy("fedavg-full"), budget=0, train=LORA_CFG,
            ids=RoundIds(client_id="c1")))
        assert res.steps > 0
        # the base did not move (a quantized weight is never written), factors are gone
        for k in model.keys():
            if parse_key(k).kind == "expert" and parse_key(k).param in ("w_in", "w_out"):
                assert torch.equal(dequantize_weight(model.parameter(k)), base[k]), k
        assert all(e.factors is None for layer in model.layers for e in layer.bank.experts)
        results[mode], models[mode] = res.update, model
    fp32, int8 = results["none"], results["int8"]
    assert quantized_keys(models["int8"]) and not quantized_keys(models["none"])
    assert set(fp32.deltas) == set(int8.deltas) and fp32.updated == int8.updated
    for k, t in int8.deltas.items():
        assert t.shape == fp32.deltas[k].shape and type(t) is torch.Tensor, k
        pk = parse_key(k.rsplit(".", 1)[0] if k.endswith((LORA_A, LORA_B)) else k)
        # no dense delta of a base weight: factors, gates and the head only
        assert k.endswith((LORA_A, LORA_B)) or not (pk.kind == "expert"
                                                   and pk.param in ("w_in", "w_out")), k
    # the server's wire spec and LoRA expansion accept it like any fp32 device's update
    spec = with_factors(spec_from_state(tiny(tokenizer).state()), LoRASpec(2, 4.0))
    expanded = expand(decode(encode(int8, 0.0), spec), LoRASpec(2, 4.0))
    assert all(torch.isfinite(t).all() for t in expanded.deltas.values())


def test_loading_a_new_global_model_requantizes_and_the_server_copy_stays_fp32(tokenizer):
    server, device = tiny(tokenizer), tiny(tokenizer)
    quantize_model(device, "int8")
    new = {k: v + 0.01 for k, v in server.state().items()}
    server.load_state(new)
    device.load_state(new)
    assert not quantized_keys(server)
    key = "layers.1.experts.2.w_out"
    assert is_quantized(device.parameter(key))
    assert torch.equal(dequantize_weight(device.parameter(key)),
                       dequantize_weight(quantize_weight(new[key], "int8")))
    assert torch.equal(device.parameter("shared.classifier.weight").detach(),
                       new["shared.classifier.weight"])
    # a state snapshot of the quantized copy loads back bit for bit (the cost measurement
    # snapshots and restores the device's model)
    h = device.state_hash()
    device.load_state(device.state())
    assert device.state_hash() == h and len(quantized_keys(device)) == 16


# --- the default model and a user's run ---------------------------------------------------------


@pytest.mark.slow
def test_default_model_int8_forward_error_and_memory(minilm_available):
    if not minilm_available:
        pytest.skip("assets extra not installed")
    from hfedmoe.models.registry import build_model

    t0 = time.monotonic()
    model = build_model(ModelConfig(), "classification", 4)
    batch = model.tokenizer(["how do I reset my router", "tell me about football tonight",
                             "what is a neural network"], return_tensors="pt", padding=True)
    ref = logits(model, batch)
    fp32 = weight_bytes(model.module)
    report = quantize_model(model, "int8")
    assert report.experts == 6 * 8 * 2 and report.linears == 6 * 4  # experts, attention
    out = logits(model, batch)
    assert rel(out, ref) < 0.2  # measured 8% on 64 held-out texts (module doc)
    # the word embeddings (47 MB) stay fp32; the quantized tensors shrink ~4x
    assert report.bytes_before == fp32 and 0.6 * fp32 < weight_bytes(model.module) < 0.7 * fp32
    assert time.monotonic() - t0 < 120


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_simulate_lora_over_an_int8_base(tmp_path, minilm_available):
    if not minilm_available:
        pytest.skip("assets extra not installed")
    from hfedmoe.config import apply_overrides
    from lab.simulate import simulate
    from server.config import ServerConfig

    data = apply_overrides({
        "run_dir": str(tmp_path / "sim"), "max_eval_examples": 32,
        "model": {"num_experts": 2, "top_k": 1, "max_length": 32, "upcycle": "copy"},
        "train": {"batch_size": 8, "max_steps": 2, "threads": 1},
        "rounds": {"rounds": 2, "train_time_s": 5.0, "fraction": 1.0}},
        ["train.adapter=lora", "model.quantize=int8"])  # what --set gives simulate
    cfg = from_dict(ServerConfig, data)
    rows = simulate(cfg, 2, ["phone-midrange-6gb", "jetson-orin-nano-8gb"], measure_repeats=1)
    rounds = [r for r in rows if r["phase"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        assert r["accepted"] == 2 and r["rejected"] == 0 and r["bytes_in"] > 0
        assert 0.0 <= r["accuracy"] <= 1.0 and r["accuracy"] == r["accuracy"]
        assert r["experts_updated"] >= 1

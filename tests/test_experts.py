"""Every registered expert path matches the eager reference on outputs and gradients."""

import pytest
import torch
from torch.testing import assert_close

from hfedmoe.errors import ModelError
from hfedmoe.experts import EXPERT_IMPLS, ExpertBank, ExpertShape


def make_bank(gated: bool, bias: bool, activation: str, trainable=(0, 2)) -> ExpertBank:
    torch.manual_seed(0)
    bank = ExpertBank(ExpertShape(16, 24, activation, gated=gated, bias=bias), 4, "eager")
    with torch.no_grad():
        for e in bank.experts:
            for p in e.parameters():
                p.normal_(std=0.3)
    for i, e in enumerate(bank.experts):
        e.requires_grad_(i in trainable)
    return bank


def run(bank: ExpertBank, impl: str, seed: int = 1):
    torch.manual_seed(seed)
    x = torch.randn(13, 16, requires_grad=True)
    idx = torch.randint(0, 4, (13, 2))
    idx[:, 1] = (idx[:, 0] + 1) % 4  # two distinct experts per token
    w = torch.rand(13, 2)
    bank.impl = impl
    y = bank(x, idx, w)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in bank.named_parameters() if p.grad is not None}
    bank.zero_grad(set_to_none=True)
    return y.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("impl", sorted(set(EXPERT_IMPLS) - {"eager"}))
@pytest.mark.parametrize("gated,bias,act", [(True, False, "silu"), (False, True, "gelu"),
                                            (False, False, "relu")])
def test_fast_paths_match_reference(impl, gated, bias, act):
    bank = make_bank(gated, bias, act)
    y_ref, gx_ref, g_ref = run(bank, "eager")
    y, gx, g = run(bank, impl)
    assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", sorted(EXPERT_IMPLS))
def test_frozen_experts_get_no_weight_gradient(impl):
    bank = make_bank(True, False, "silu", trainable=(1,))
    _, _, grads = run(bank, impl)
    assert {n.split(".")[1] for n in grads} == {"1"}


@pytest.mark.parametrize("impl", sorted(EXPERT_IMPLS))
def test_detach_frozen_keeps_outputs_and_cuts_input_gradient(impl):
    bank = make_bank(True, False, "silu", trainable=(0,))
    y_ref, gx_ref, g_ref = run(bank, impl)
    bank.detach_frozen = True
    y, gx, g = run(bank, impl)
    assert_close(y, y_ref)  # forward values are identical
    assert_close(g["experts.0.w_in"], g_ref["experts.0.w_in"])  # trained expert's weights exact
    assert not torch.allclose(gx, gx_ref)  # frozen experts no longer pass gradient to x


def test_dropped_tokens_are_skipped_by_every_path():
    bank = make_bank(True, False, "silu")
    x = torch.randn(5, 16)
    idx = torch.tensor([[0], [-1], [2], [-1], [3]])
    w = torch.ones(5, 1)
    outs = []
    for impl in sorted(EXPERT_IMPLS):
        bank.impl = impl
        outs.append(bank(x, idx, w))
    for out in outs:
        assert_close(out, outs[0])
        assert torch.all(out[1] == 0) and torch.all(out[3] == 0)


def test_fused_round_trip_and_bad_impl():
    torch.manual_seed(0)
    gate_up, down = torch.randn(3, 10, 4), torch.randn(3, 4, 5)
    bank = ExpertBank.from_fused(gate_up, down, "silu")
    w_in, w_out = bank.to_fused()
    assert torch.equal(w_in, gate_up) and torch.equal(w_out, down)
    with pytest.raises(ModelError, match="unknown expert path"):
        bank.impl = "nope"
    with pytest.raises(ModelError, match="activation"):
        ExpertShape(4, 4, "tanhh")


def run_autocast(bank: ExpertBank, impl: str):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return run(bank, impl)


@pytest.mark.parametrize("impl", sorted(set(EXPERT_IMPLS) - {"eager"}))
def test_fast_paths_match_reference_under_bf16_autocast(impl):
    bank = make_bank(False, True, "gelu")
    y_ref, gx_ref, g_ref = run_autocast(bank, "eager")
    y, gx, g = run_autocast(bank, impl)
    tol = {"rtol": 2e-2, "atol": 2e-2}  # bf16 matmuls, summed in a different order
    assert_close(y.float(), y_ref.float(), **tol)
    assert_close(gx.float(), gx_ref.float(), **tol)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert_close(g[name], g_ref[name], **tol)


def test_grouped_path_runs_its_gemms_in_the_autocast_dtype(monkeypatch):
    import hfedmoe.experts as experts_mod

    seen = []
    real = experts_mod.F.grouped_mm

    def spy(a, b, **kw):
        seen.append((a.dtype, b.dtype))
        return real(a, b, **kw)

    monkeypatch.setattr(experts_mod.F, "grouped_mm", spy)
    bank = make_bank(True, True, "silu")
    run_autocast(bank, "grouped")
    assert seen and all(d == (torch.bfloat16, torch.bfloat16) for d in seen)
    seen.clear()
    run(bank, "grouped")
    assert seen and all(d == (torch.float32, torch.float32) for d in seen)


def test_sorted_path_with_all_tokens_on_one_expert_and_all_frozen():
    bank = make_bank(False, True, "gelu", trainable=())
    x = torch.randn(6, 16, requires_grad=True)
    idx = torch.full((6, 2), 3)
    w = torch.rand(6, 2, requires_grad=True)
    outs = {}
    for impl in ("eager", "sorted"):
        bank.impl = impl
        y = bank(x, idx, w)
        y.square().sum().backward()
        outs[impl] = (y.detach(), x.grad.clone(), w.grad.clone())
        x.grad = w.grad = None
    for ref, got in zip(outs["eager"], outs["sorted"], strict=True):
        assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gated,bias,act", [(True, False, "silu"), (False, True, "gelu")])
def test_grouped_path_without_grouped_mm_matches_reference(monkeypatch, gated, bias, act):
    """torch builds without F.grouped_mm (JetPack 6's) take one GEMM pair per expert block."""
    import hfedmoe.experts as experts_mod

    monkeypatch.setattr(experts_mod, "HAS_GROUPED_MM", False)
    monkeypatch.delattr(experts_mod.F, "grouped_mm")  # a call would now fail loudly
    bank = make_bank(gated, bias, act)
    y_ref, gx_ref, g_ref = run(bank, "eager")
    y, gx, g = run(bank, "grouped")
    assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-6)


def test_sorted_path_pads_low_precision_blocks_to_cached_shapes():
    """bf16 on a CPU: every expert GEMM sees a multiple of 32 rows (oneDNN compiles a kernel
    per new shape); fp32 runs the exact row counts. Outputs and gradients as the eager path."""
    from hfedmoe.experts import LOW_PRECISION_ROW_MULTIPLE

    bank = make_bank(True, True, "silu")
    seen: list[int] = []
    hooks = [e.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[0]))
             for e in bank.experts]
    run_autocast(bank, "sorted")
    assert seen and all(n % LOW_PRECISION_ROW_MULTIPLE == 0 for n in seen), seen
    seen.clear()
    run(bank, "sorted")
    assert sum(seen) == 13 * 2  # fp32: the routed rows exactly, no padding
    for h in hooks:
        h.remove()
    y_ref, gx_ref, g_ref = run_autocast(bank, "eager")
    y, gx, g = run_autocast(bank, "sorted")
    tol = {"rtol": 2e-2, "atol": 2e-2}
    assert_close(y.float(), y_ref.float(), **tol)
    assert_close(gx.float(), gx_ref.float(), **tol)
    for name in g_ref:
        assert_close(g[name], g_ref[name], **tol)

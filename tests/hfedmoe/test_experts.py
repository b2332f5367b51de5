"""Every registered expert path matches the eager reference on outputs and gradients.

The ``"capacity"`` path runs here at capacity factor E/k = 2 (nothing dropped) unless a test
says otherwise; its drops are checked against the eager path on the index with the dropped
pairs replaced by an out-of-range id.
"""

import pytest
import torch
from torch.testing import assert_close

from hfedmoe.errors import ModelError
from hfedmoe.experts import EXPERT_IMPLS, ExpertBank, ExpertShape, expert_capacity


def make_bank(gated: bool, bias: bool, activation: str, trainable=(0, 2),
              capacity_factor: float = 2.0) -> ExpertBank:
    torch.manual_seed(0)
    bank = ExpertBank(ExpertShape(16, 24, activation, gated=gated, bias=bias), 4, "eager",
                      capacity_factor=capacity_factor)
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


# --- the "capacity" path ---------------------------------------------------------------------
def kept_index(idx: torch.Tensor, num_experts: int, cap: int) -> torch.Tensor:
    """``idx`` with every pair past its expert's capacity (first come, flat slot order) and
    every out-of-range id replaced by -1: what the capacity path computes, for the eager path."""
    flat = idx.reshape(-1).tolist()
    seen = [0] * num_experts
    out = []
    for e in flat:
        if 0 <= e < num_experts and seen[e] < cap:
            seen[e] += 1
            out.append(e)
        else:
            out.append(-1)
    return torch.tensor(out).reshape(idx.shape)


def run_pairs(bank: ExpertBank, impl: str, x0: torch.Tensor, idx: torch.Tensor,
              w0: torch.Tensor):
    """Forward, and gradients of x, of the routing weights and of the bank's parameters."""
    x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    bank.impl = impl
    y = bank(x, idx, w)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in bank.named_parameters() if p.grad is not None}
    bank.zero_grad(set_to_none=True)
    return y.detach(), x.grad.clone(), w.grad.clone(), grads


def assert_same(got, want):
    for g, r in zip(got[:3], want[:3], strict=True):
        assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert got[3].keys() == want[3].keys() and got[3]
    for name in want[3]:
        assert_close(got[3][name], want[3][name], rtol=1e-5, atol=1e-6)


def unbalanced(num_tokens: int = 13, seed: int = 1):
    """Every token's first choice is expert 0 (a tie of all tokens), its second is random among
    1..3: expert 0 gets T pairs, far past its capacity at a factor below E/k."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, 16, generator=g)
    idx = torch.stack([torch.zeros(num_tokens, dtype=torch.long),
                       torch.randint(1, 4, (num_tokens,), generator=g)], 1)
    w = torch.rand(num_tokens, 2, generator=g)
    return x, idx, w


def test_expert_capacity_rounds_up_and_never_exceeds_the_tokens():
    assert expert_capacity(13, 2, 4, 0.5) == 4  # ceil(3.25)
    assert expert_capacity(16, 2, 4, 1.0) == 8
    assert expert_capacity(13, 2, 4, 2.0) == 13  # factor E/k: every token fits
    assert expert_capacity(13, 2, 4, 10.0) == 13
    assert expert_capacity(100, 1, 10, 1.1) == 11  # 1.1 * 10 is 11.000000000000002 in floats
    assert expert_capacity(3, 2, 8, 0.01) == 1
    assert expert_capacity(3, 2, 8, 1e-12) == 1
    assert expert_capacity(0, 2, 8, 1.25) == 0


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25])
@pytest.mark.parametrize("gated,bias,act", [(True, False, "silu"), (False, True, "gelu")])
def test_capacity_path_equals_eager_with_the_dropped_pairs_skipped(factor, gated, bias, act):
    bank = make_bank(gated, bias, act, trainable=(0, 2), capacity_factor=factor)
    x, idx, w = unbalanced()
    cap = expert_capacity(13, 2, 4, factor)
    kept = kept_index(idx, 4, cap)
    dropped = int((kept < 0).sum())
    assert dropped >= 13 - cap > 0  # expert 0 alone drops T - cap pairs
    got = run_pairs(bank, "capacity", x, idx, w)
    assert (int(bank.dropped_pairs), int(bank.routed_pairs)) == (dropped, 26)
    assert_same(got, run_pairs(bank, "eager", x, kept, w))
    # the kept pairs of expert 0 are the first tokens (first come, first served)
    assert kept[:cap, 0].tolist() == [0] * cap and (kept[cap:, 0] == -1).all()
    # and the drops do change the layer's output
    assert (got[0] - run_pairs(bank, "eager", x, idx, w)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("factor", [2.0, 3.0])
def test_capacity_path_at_factor_e_over_k_drops_nothing(factor):
    bank = make_bank(True, True, "silu", trainable=(0, 3), capacity_factor=factor)
    x, idx, w = unbalanced(seed=2)
    got = run_pairs(bank, "capacity", x, idx, w)
    assert (int(bank.dropped_pairs), int(bank.routed_pairs)) == (0, 26)
    assert_same(got, run_pairs(bank, "eager", x, idx, w))


def test_capacity_path_with_ties_out_of_range_ids_and_detached_frozen_experts():
    """Duplicated rows (ties in the router), ids -1 and E that take no capacity, a frozen
    expert run without autograd: still the eager path on the kept index."""
    bank = make_bank(False, True, "relu", trainable=(1,), capacity_factor=0.75)
    bank.detach_frozen = True
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 16, generator=g)
    x[5:] = x[:5]  # tied tokens
    idx = torch.tensor([[1, 2], [1, -1], [4, 1], [1, 0], [2, 1],
                        [1, 2], [-1, 1], [1, 4], [3, 1], [1, 2]])
    w = torch.rand(10, 2, generator=g)
    cap = expert_capacity(10, 2, 4, 0.75)  # ceil(3.75) = 4
    kept = kept_index(idx, 4, cap)
    assert cap == 4 and (kept == 1).sum() == 4 and (idx == 1).sum() == 10
    got = run_pairs(bank, "capacity", x, idx, w)
    assert (int(bank.dropped_pairs), int(bank.routed_pairs)) == (6, 16)  # 4 ids out of range
    assert_same(got, run_pairs(bank, "eager", x, kept, w))
    assert set(got[3]) == {"experts.1.w_in", "experts.1.b_in", "experts.1.w_out",
                           "experts.1.b_out"}


def test_capacity_factor_must_be_positive():
    with pytest.raises(ModelError, match="capacity_factor"):
        ExpertBank(ExpertShape(4, 4), 2, capacity_factor=0.0)
    bank = ExpertBank(ExpertShape(4, 4), 2)
    assert bank.capacity_factor == 1.25 and bank.dropped_pairs is None
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ModelError, match="capacity_factor"):
            bank.capacity_factor = bad


def test_capacity_path_exports_with_static_shapes():
    """torch.export traces it once for every routing: no data-dependent op, and the export
    leaves the bank's drop counts alone."""

    class Wrap(torch.nn.Module):
        def __init__(self, bank: ExpertBank) -> None:
            super().__init__()
            self.bank = bank

        def forward(self, x, idx, w):
            return self.bank(x, idx, w)

    bank = make_bank(True, False, "silu", capacity_factor=0.5)
    bank.impl = "capacity"
    x, idx, w = unbalanced()
    ep = torch.export.export(Wrap(bank), (x, idx, w))
    assert bank.dropped_pairs is None
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any(name in op for op in ops for name in ("nonzero", "unique", "bincount",
                                                          "_local_scalar_dense"))
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        other = torch.randint(0, 4, (13, 2), generator=g)
        with torch.no_grad():
            assert_close(ep.module()(x, other, w), bank(x, other, w), rtol=0, atol=1e-6)

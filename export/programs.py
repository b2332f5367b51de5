"""The modules that get exported: static-shape inference and per-device training programs.

Both wrap a :class:`~hfedmoe.models.base.MoEModel` whose expert banks run a static-shape path,
which ExecuTorch and ONNX need (:func:`export_mode`):

- ``"dense"`` (the default; inference always): every expert on every token, masked by the
  routing weights; top-k with a constant k and the scatter into a (tokens, experts) weight
  matrix. Exact: the model's own forward.
- ``"capacity"`` (training programs given a ``capacity_factor``): every expert runs on a block
  of ``cap = min(T, ceil(capacity_factor * T * k / E))`` rows (T tokens of the batch, k routed
  experts each, E experts per layer), filled first come first served in token order; a
  token-expert pair past its expert's capacity is dropped (no output, no gradient). The expert
  work falls to about ``capacity_factor * k / E`` of dense, but the forward is the model's only
  when nothing is dropped (``capacity_factor >= E / k``); see
  :func:`hfedmoe.experts.capacity_experts`.

:class:`TrainingProgram` is the on-device training program of one bucket of ``B`` trainable
experts. Its trainable expert weights are generic *slots* ``slot_w_in`` (B, d_in, d) etc.,
not particular experts: the input ``slot_expert_index`` (B,) int64 says which expert each slot
plays (flat id ``layer_idx * num_experts + expert_idx``; ``-1`` leaves a slot unused). Inside,
a one-hot (B, L*E) selection places the slots into the expert positions::

    W_(l,e) = keep_(l,e) * W0_(l,e) + sum_b sel_(b, l*E+e) * slot_b      (frozen mode)
    W_(l,e) =                         sum_b sel_(b, l*E+e) * slot_b      (dropped mode)

with ``keep = 1 - sum_b sel``. Values are exact (x*0 and x*1 are exact in IEEE arithmetic), so
the forward equals the full model (on the program's expert path: with a ``capacity_factor``,
the model with the same pairs dropped) and a slot's gradient is exactly its expert's gradient.
One program therefore serves every device whose selection fits the bucket, for one global model
(the other weights are constants of the program). In ``"dropped"`` mode the other experts are
not in the program at all and their router logits are masked to -inf, so tokens go to kept
experts only: **that changes the forward** (a smaller program that computes a different model).

:class:`LoRATrainingProgram` is the same program for ``train.adapter = "lora"``: its slots are
LoRA factors (``slot_lora_A_in`` (B, r, d_model), ``slot_lora_B_in`` (B, d_in, r),
``slot_lora_A_out`` (B, r, d_ff), ``slot_lora_B_out`` (B, d_model, r), plus bias slots when the
experts have biases), placed by the same one-hot selection; every expert's ``w_in``/``w_out``
is a constant of the program and the expert computes ``x W^T + scale * x A^T B^T``
(:meth:`hfedmoe.lora.ExpertFactors.apply`, the eager LoRA's own ops). Frozen mode only.

Both serve a classifier (``labels`` (B,) class ids, cross-entropy of the head's logits) and a
causal LM (``labels`` (B, S): the token ids with ``-100`` on the prompt and padding; the loss is
the model's own response-only next-token cross-entropy), the loss the eager trainer takes
(:func:`task_forward`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from hfedmoe.errors import ExportError
from hfedmoe.lora import ExpertFactors, LoRASpec
from hfedmoe.models.base import MoEModel
from hfedmoe.models.moe import TopKRouter
from hfedmoe.names import ExpertId, expert_key

BUCKETS = (1, 2, 4, 8)
DropMode = Literal["frozen", "dropped"]


def bucket_for(budget: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The largest bucket not above ``budget`` (round down: never exceed a device's budget)."""
    fitting = [b for b in sorted(buckets) if b <= budget]
    if not fitting:
        raise ExportError(f"budget {budget} is below the smallest bucket {min(buckets)}")
    return fitting[-1]


def flat_expert_index(model: MoEModel, experts: Sequence[ExpertId], bucket: int) -> torch.Tensor:
    """The ``slot_expert_index`` input: (bucket,) int64 flat ids, padded with -1."""
    if len(experts) > bucket:
        raise ExportError(f"{len(experts)} experts do not fit bucket {bucket}")
    if len(set(experts)) != len(experts):
        raise ExportError(f"duplicate experts in {[str(e) for e in experts]}")
    num_experts = model.layers[0].num_experts
    ids = []
    for eid in experts:
        layer = model.layer(eid.layer_idx)
        if not 0 <= eid.expert_idx < layer.num_experts:
            raise ExportError(f"expert {eid} out of range: layer has {layer.num_experts}")
        ids.append(eid.layer_idx * num_experts + eid.expert_idx)
    return torch.tensor(ids + [-1] * (bucket - len(ids)), dtype=torch.int64)


@dataclass
class _SavedState:
    impl: list[str]
    detach: list[bool]
    capacity: list[float]
    requires_grad: dict[int, bool]
    training: bool


def _configs(module: nn.Module) -> list[object]:
    found: dict[int, object] = {}
    for sub in module.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            found.setdefault(id(cfg), cfg)
    return list(found.values())


@contextlib.contextmanager
def attention_implementation(module: nn.Module, impl: str | None) -> Iterator[None]:
    """Switch every transformers config inside ``module`` to attention ``impl`` while inside.

    The training programs need ``"eager"``: the backward of SDPA's CPU flash kernel
    (``aten._scaled_dot_product_flash_attention_for_cpu_backward``) is not a core ATen op, so
    ``to_edge`` rejects it. Inference exports keep the model's own (``sdpa``) attention.
    """
    configs = _configs(module) if impl is not None else []
    saved = [cfg._attn_implementation for cfg in configs]  # type: ignore[attr-defined]
    for cfg in configs:
        cfg._attn_implementation = impl  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for cfg, value in zip(configs, saved, strict=True):
            cfg._attn_implementation = value  # type: ignore[attr-defined]


def expert_path(capacity_factor: float | None) -> str:
    """The static-shape expert path of a program: ``"dense"``, or ``"capacity"`` with a
    factor."""
    if capacity_factor is None:
        return "dense"
    if not capacity_factor > 0:
        raise ExportError(f"capacity_factor must be > 0, got {capacity_factor}")
    return "capacity"


@contextlib.contextmanager
def static_experts(model: MoEModel, capacity_factor: float | None = None) -> Iterator[None]:
    """While inside, every bank runs :func:`expert_path` (``capacity_factor`` with it); the
    banks' paths and factors are restored after."""
    impl = expert_path(capacity_factor)
    saved = [(ly.bank.impl, ly.bank.capacity_factor) for ly in model.layers]
    for layer in model.layers:
        layer.bank.impl = impl
        if capacity_factor is not None:
            layer.bank.capacity_factor = capacity_factor
    try:
        yield
    finally:
        for layer, (old_impl, old_factor) in zip(model.layers, saved, strict=True):
            layer.bank.impl, layer.bank.capacity_factor = old_impl, old_factor


@contextlib.contextmanager
def export_mode(model: MoEModel, attn: str | None = None,
                capacity_factor: float | None = None) -> Iterator[MoEModel]:
    """Static-shape experts and eval mode while inside (and attention ``attn`` if given); the
    model's state is restored after. The experts run ``"dense"``, or ``"capacity"`` with
    ``capacity_factor`` (:func:`expert_path`)."""
    impl = expert_path(capacity_factor)
    saved = _SavedState([ly.bank.impl for ly in model.layers],
                        [ly.bank.detach_frozen for ly in model.layers],
                        [ly.bank.capacity_factor for ly in model.layers],
                        {id(p): p.requires_grad for p in model.module.parameters()},
                        model.module.training)
    model.set_expert_impl(impl, detach_frozen=False, capacity_factor=capacity_factor)
    model.module.eval()
    try:
        with attention_implementation(model.module, attn):
            yield model
    finally:
        for layer, impl, detach, factor in zip(model.layers, saved.impl, saved.detach,
                                               saved.capacity, strict=True):
            layer.bank.impl, layer.bank.detach_frozen = impl, detach
            layer.bank.capacity_factor = factor
        for p in model.module.parameters():
            p.requires_grad_(saved.requires_grad[id(p)])
        model.module.train(saved.training)


class InferenceProgram(nn.Module):
    """``forward(input_ids (B, S), attention_mask (B, S)) -> logits``."""

    def __init__(self, model: MoEModel) -> None:
        super().__init__()
        self.net = model.module

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids, attention_mask=attention_mask).logits


def _normalise(router: nn.Module, top_w: torch.Tensor) -> torch.Tensor:
    if isinstance(router, TopKRouter):
        if router.norm_topk == "exact":
            return top_w / top_w.sum(-1, keepdim=True)
        if router.norm_topk == "detached":
            return top_w / top_w.sum(-1, keepdim=True).detach()
        return top_w
    norm = getattr(router, "norm_topk_prob", type(router).__name__.startswith("Mixtral"))
    return top_w / top_w.sum(-1, keepdim=True) if norm else top_w


def masked_router_forward(router: nn.Module, hidden_states: torch.Tensor,
                          mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A softmax top-k router with ``mask`` (E,) (0 or -inf) added to its logits.

    Same contract and numbers (for a zero mask) as :class:`TopKRouter` and transformers 5's
    softmax ``*TopKRouter`` modules (Qwen2/3-MoE, OLMoE, Mixtral).
    """
    weight = router.weight
    x = hidden_states.reshape(-1, weight.shape[1])  # (T, d)
    logits = F.linear(x, weight) + mask  # (T, E)
    probs = torch.softmax(logits.float(), dim=-1)
    top_w, top_idx = torch.topk(probs, router.top_k, dim=-1)  # (T, k)
    return logits, _normalise(router, top_w).to(x.dtype), top_idx


def _check_maskable(model: MoEModel) -> None:
    for layer in model.layers:
        if layer.score_fn != "softmax" or not hasattr(layer.router, "top_k") \
                or not isinstance(getattr(layer.router, "weight", None), torch.Tensor):
            raise ExportError(f"{model.family}: dropped experts need a softmax top-k router; "
                              f"layer {layer.layer_idx} has {type(layer.router).__name__}")


TASKS = ("classification", "causal-lm")


def check_task(model: MoEModel) -> None:
    """Training programs compute the loss of a classifier or of a causal LM (:data:`TASKS`)."""
    if model.task not in TASKS:
        raise ExportError(f"training programs support {', '.join(TASKS)}, not {model.task!r}")


def task_forward(model: MoEModel, overrides: dict[str, torch.Tensor], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.module`` with ``overrides`` in place of its tensors: ``(loss, logits)``.

    The loss is what the eager trainer's ``model.module(**batch).loss`` computes:

    - ``"classification"``: cross-entropy of the head's logits (B, num_labels) and ``labels``
      (B,).
    - ``"causal-lm"``: ``labels`` (B, S) go into the model, so the loss is the family's own
      (transformers' ``ForCausalLMLoss``: labels shifted left by one, mean next-token
      cross-entropy over the positions whose label is not ``-100``, the prompt and padding of
      :func:`hfedmoe.data.tokenization.causal_lm_batch`; plus the router auxiliary loss when
      the config asks for it). Its ops (``pad``, ``log_softmax``, ``nll_loss`` with an ignore
      index) are core ATen, so the program exports as the classifier's does.
    """
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if model.task == "causal-lm":
        kwargs["labels"] = labels
    out = torch.func.functional_call(model.module, overrides, (), kwargs, strict=False)
    logits = out.logits  # (B, num_labels) or (B, S, vocab)
    loss = out.loss if model.task == "causal-lm" else F.cross_entropy(logits, labels)
    return loss, logits


class TrainingProgram(nn.Module):
    """``forward(input_ids, attention_mask, labels, slot_expert_index) -> (loss, logits)``.

    Trainable parameters: the slots (``slot_<param>`` of shape (bucket, *expert param shape)),
    plus the gates and shared parts when ``gates``/``shared`` (as ``MoEModel.set_trainable``).
    Everything else is a frozen constant of the exported program. The forward runs the banks on
    the ``"dense"`` path, or on the ``"capacity"`` path with ``capacity_factor``.
    """

    def __init__(self, model: MoEModel, bucket: int, mode: DropMode = "frozen",
                 gates: bool = True, shared: bool = True,
                 capacity_factor: float | None = None) -> None:
        super().__init__()
        if mode not in ("frozen", "dropped"):
            raise ExportError(f"unknown expert mode {mode!r} (frozen, dropped)")
        expert_path(capacity_factor)  # checks the factor
        self.capacity_factor = capacity_factor
        check_task(model)
        shapes = {(ly.num_experts, ly.bank.shape) for ly in model.layers}
        if len(shapes) != 1:
            raise ExportError(f"{model.family}: slots need the same experts in every layer")
        if mode == "dropped":
            _check_maskable(model)
        self.model = model
        self.net = model.module
        self.bucket = bucket
        self.mode = mode
        self.num_layers = model.num_layers
        self.num_experts = model.layers[0].num_experts
        first = model.layers[0].bank.experts[0]
        self.param_names = [n for n, _ in first.named_parameters()]
        # Module path (inside self.net) of every expert parameter, per layer and expert.
        paths = {id(p): n for n, p in self.net.named_parameters()}
        self.paths = [[{n: paths[id(p)] for n, p in ex.named_parameters()}
                       for ex in ly.bank.experts] for ly in model.layers]
        model.set_trainable((), gates=gates, shared=shared)
        for name, p in first.named_parameters():
            slot = torch.zeros(bucket, *p.shape, dtype=p.dtype)
            self.register_parameter(f"slot_{name}", nn.Parameter(slot))
        if mode == "frozen":  # the experts' weights as one (E, numel) constant per layer/param
            for l_idx, layer in enumerate(model.layers):
                for name in self.param_names:
                    base = torch.stack([getattr(ex, name).detach().reshape(-1)
                                        for ex in layer.bank.experts])
                    self.register_buffer(f"base_{l_idx}_{name}", base.clone())
        self._mask: list[torch.Tensor] | None = None

    def slot(self, name: str) -> nn.Parameter:
        return getattr(self, f"slot_{name}")

    def load_slots(self, experts: Sequence[ExpertId]) -> None:
        """Copy the current weights of ``experts`` into the slots (unused slots: zeros)."""
        with torch.no_grad():
            for name in self.param_names:
                slot = self.slot(name)
                slot.zero_()
                for b, eid in enumerate(experts):
                    slot[b].copy_(self.model.parameter(expert_key(eid.layer_idx,
                                                                  eid.expert_idx, name)))

    def slot_state(self, experts: Sequence[ExpertId],
                   slots: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Canonical key -> the slot tensor of each of ``experts`` (from ``slots`` if given)."""
        src = slots if slots is not None else {n: self.slot(n).detach() for n in self.param_names}
        return {expert_key(eid.layer_idx, eid.expert_idx, n): src[n][b].clone()
                for b, eid in enumerate(experts) for n in self.param_names}

    def _overrides(self, slot_expert_index: torch.Tensor) -> dict[str, torch.Tensor]:
        total = self.num_layers * self.num_experts
        ids = torch.arange(total, dtype=slot_expert_index.dtype)
        dtype = self.slot(self.param_names[0]).dtype
        sel = (slot_expert_index[:, None] == ids[None, :]).to(dtype)  # (bucket, L*E)
        out: dict[str, torch.Tensor] = {}
        masks = []
        for l_idx in range(self.num_layers):
            lsel = sel[:, l_idx * self.num_experts:(l_idx + 1) * self.num_experts]  # (bucket, E)
            chosen = lsel.sum(0)  # (E,)
            masks.append(torch.where(chosen > 0, 0.0, float("-inf")).to(dtype))
            keep = (1 - chosen)[:, None]  # (E, 1)
            for name in self.param_names:
                slot = self.slot(name)
                mixed = lsel.t() @ slot.reshape(self.bucket, -1)  # (E, numel)
                if self.mode == "frozen":
                    mixed = getattr(self, f"base_{l_idx}_{name}") * keep + mixed
                per_expert = mixed.reshape(self.num_experts, *slot.shape[1:]).unbind(0)
                for e, value in enumerate(per_expert):
                    out[self.paths[l_idx][e][name]] = value
        self._mask = masks
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                slot_expert_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        overrides = self._overrides(slot_expert_index)
        with self._routing(), static_experts(self.model, self.capacity_factor):
            loss, logits = task_forward(self.model, overrides, input_ids, attention_mask,
                                        labels)
        return loss, logits.detach()

    @contextlib.contextmanager
    def _routing(self) -> Iterator[None]:
        if self.mode != "dropped":
            yield
            return
        masks = self._mask
        assert masks is not None
        routers = [layer.router for layer in self.model.layers]
        for router, mask in zip(routers, masks, strict=True):
            router.forward = (lambda h, r=router, m=mask: masked_router_forward(r, h, m))
        try:
            yield
        finally:
            for router in routers:
                del router.forward

    @contextlib.contextmanager
    def without_expert_tensors(self) -> Iterator[None]:
        """While inside, the banks' own expert tensors are empty placeholders, so exporting
        leaves them out of the program (the forward uses the slots and ``base_*`` buffers)."""
        saved = []
        for layer in self.model.layers:
            for expert in layer.bank.experts:
                for name in self.param_names:
                    saved.append((expert, name, expert._parameters[name]))
                    expert._parameters[name] = nn.Parameter(torch.empty(0), requires_grad=False)
        try:
            yield
        finally:
            for expert, name, p in saved:
                expert._parameters[name] = p


# slot tensor of a LoRA program -> (expert weight, factor) it holds for every slot
LORA_SLOTS = {"slot_lora_A_in": ("w_in", "lora_A"), "slot_lora_B_in": ("w_in", "lora_B"),
              "slot_lora_A_out": ("w_out", "lora_A"), "slot_lora_B_out": ("w_out", "lora_B")}


class _PlacedFactors(ExpertFactors):
    """An expert's factors as placed from the slots inside the program's forward: the same
    :meth:`ExpertFactors.apply` (so the same ops as eager LoRA) on given tensors."""

    def __init__(self, factors: dict[str, torch.Tensor], scale: float) -> None:  # noqa: D107
        self.factors = factors
        self.scale = scale


class LoRATrainingProgram(nn.Module):
    """The training program of one bucket with LoRA factor slots instead of expert weights.

    ``forward(input_ids, attention_mask, labels, slot_expert_index) -> (loss, logits)``, like
    :class:`TrainingProgram`. Trainable: ``slot_lora_A_in`` (bucket, r, d_model),
    ``slot_lora_B_in`` (bucket, d_in, r), ``slot_lora_A_out`` (bucket, r, d_ff),
    ``slot_lora_B_out`` (bucket, d_model, r), bias slots ``slot_b_in``/``slot_b_out`` when the
    experts have biases, plus the gates and shared parts. Every expert's ``w_in``/``w_out`` is
    a constant of the program (frozen mode only). The one-hot selection places the slots::

        A_(l,e) = sum_b sel_(b, l*E+e) * slot_A_b        (zero for an expert no slot plays)
        b_(l,e) = keep_(l,e) * b0_(l,e) + sum_b sel_(b, l*E+e) * slot_b_b

    and every expert runs ``Expert.forward`` with these factors attached, i.e.
    ``x W^T + scale * x A^T B^T`` (:meth:`hfedmoe.lora.ExpertFactors.apply`). For an expert no
    slot plays the factor term is exactly zero, so the program's forward at B = 0 equals the
    model's, and a slot's gradient is exactly the gradient of its expert's factors. The banks
    run ``"dense"``, or ``"capacity"`` with ``capacity_factor`` (both call ``Expert.forward``).
    """

    def __init__(self, model: MoEModel, bucket: int, lora: LoRASpec, gates: bool = True,
                 shared: bool = True, capacity_factor: float | None = None) -> None:
        super().__init__()
        check_task(model)
        expert_path(capacity_factor)  # checks the factor
        self.capacity_factor = capacity_factor
        shapes = {(ly.num_experts, ly.bank.shape) for ly in model.layers}
        if len(shapes) != 1:
            raise ExportError(f"{model.family}: slots need the same experts in every layer")
        self.model = model
        self.net = model.module
        self.bucket = bucket
        self.lora = lora
        self.mode: DropMode = "frozen"
        self.num_layers = model.num_layers
        self.num_experts = model.layers[0].num_experts
        first = model.layers[0].bank.experts[0]
        self.bias_names = [n for n in ("b_in", "b_out") if getattr(first, n) is not None]
        paths = {id(p): n for n, p in self.net.named_parameters()}
        self.paths = [[{n: paths[id(getattr(ex, n))] for n in self.bias_names}
                       for ex in ly.bank.experts] for ly in model.layers]
        model.set_trainable((), gates=gates, shared=shared)  # experts: constants
        r = lora.rank
        (d_in, d_model), d_ff = first.w_in.shape, first.w_out.shape[1]
        factor_shapes = {"slot_lora_A_in": (r, d_model), "slot_lora_B_in": (d_in, r),
                         "slot_lora_A_out": (r, d_ff), "slot_lora_B_out": (d_model, r)}
        # slot tensor -> the suffix of its canonical key under an expert
        self.slots: dict[str, str] = {}
        for name, shape in factor_shapes.items():  # float32, as ExpertFactors
            self.register_parameter(name, nn.Parameter(torch.zeros(bucket, *shape)))
            weight, part = LORA_SLOTS[name]
            self.slots[name] = f"{weight}.{part}"
        for name in self.bias_names:
            p = getattr(first, name)
            self.register_parameter(f"slot_{name}",
                                    nn.Parameter(torch.zeros(bucket, *p.shape, dtype=p.dtype)))
            self.slots[f"slot_{name}"] = name

    def _place(self, slot_expert_index: torch.Tensor
               ) -> tuple[dict[str, torch.Tensor], list[list[_PlacedFactors]]]:
        total = self.num_layers * self.num_experts
        ids = torch.arange(total, dtype=slot_expert_index.dtype)
        sel = (slot_expert_index[:, None] == ids[None, :]).to(self.slot_lora_A_in.dtype)
        overrides: dict[str, torch.Tensor] = {}
        factors: list[list[_PlacedFactors]] = []
        for l_idx, layer in enumerate(self.model.layers):
            lsel = sel[:, l_idx * self.num_experts:(l_idx + 1) * self.num_experts]  # (bucket, E)
            placed: list[dict[str, torch.Tensor]] = [{} for _ in range(self.num_experts)]
            for name in LORA_SLOTS:
                slot = getattr(self, name)
                mixed = lsel.t() @ slot.reshape(self.bucket, -1)  # (E, numel)
                per_expert = mixed.reshape(self.num_experts, *slot.shape[1:]).unbind(0)
                for e, value in enumerate(per_expert):
                    placed[e][self.slots[name]] = value
            factors.append([_PlacedFactors(f, self.lora.scale) for f in placed])
            keep = (1 - lsel.sum(0))[:, None]  # (E, 1)
            for name in self.bias_names:
                slot = getattr(self, f"slot_{name}")
                base = torch.stack([getattr(ex, name) for ex in layer.bank.experts])  # (E, n)
                mixed = base * keep.to(base.dtype) + lsel.t().to(slot.dtype) @ slot
                for e, value in enumerate(mixed.unbind(0)):
                    overrides[self.paths[l_idx][e][name]] = value
        return overrides, factors

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                slot_expert_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        overrides, factors = self._place(slot_expert_index)
        experts = [ex for layer in self.model.layers for ex in layer.bank.experts]
        if any(ex.factors is not None for ex in experts):
            raise ExportError("the model's experts already carry LoRA factors")
        for ex, f in zip(experts, [f for per_layer in factors for f in per_layer], strict=True):
            ex.factors = f
        try:
            with static_experts(self.model, self.capacity_factor):
                loss, logits = task_forward(self.model, overrides, input_ids, attention_mask,
                                            labels)
        finally:
            for ex in experts:
                ex.factors = None
        return loss, logits.detach()

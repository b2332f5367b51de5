"""The uniform view of any supported MoE model: layers, experts, gates, shared parts.

:class:`MoEModel` wraps a ``torch.nn.Module`` whose MoE layers have been given per-expert
parameters (:class:`hfedmoe.experts.ExpertBank`) and exposes, by canonical name
(:mod:`hfedmoe.names`):

- the gate scores G_e(x) of every token at every MoE layer (:meth:`MoEModel.capture`), the
  input of the paper's Eq. 3-16;
- which experts train (:meth:`MoEModel.set_trainable`): the others get no gradient, hence no
  optimizer state and no weight-gradient compute;
- reading and writing one expert, one gate and the shared trainable parts.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from hfedmoe.errors import ModelError
from hfedmoe.experts import ExpertBank
from hfedmoe.names import ExpertId, expert_key, gate_key, parse_key, shared_key
from hfedmoe.quantize import dequantize_weight, is_quantized, requantize

ScoreFn = Literal["softmax", "sigmoid"]
# Turns a router module's output into (router_logits (T, E), routed expert ids (T, k)).
RouterDecoder = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


def decode_topk_router(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers 5 ``*TopKRouter`` (and ours): ``(logits, top_k_weights, top_k_index)``."""
    logits, _, index = output
    return logits, index


@dataclass
class MoELayer:
    """One MoE layer: its experts, its router and how to read the router's output."""

    layer_idx: int
    path: str  # module path of the MoE block inside the wrapped model
    bank: ExpertBank
    router: nn.Module
    top_k: int
    score_fn: ScoreFn = "softmax"
    decode: RouterDecoder = decode_topk_router
    # The module whose forward output ``decode`` reads during a capture; None: ``router``.
    tap: nn.Module | None = None

    @property
    def num_experts(self) -> int:
        return self.bank.num_experts

    def gate_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.router.named_parameters())

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """G_e(x) for every token: (T, E) probabilities from (T, E) router logits."""
        logits = logits.detach().float().reshape(-1, self.num_experts)
        if self.score_fn == "softmax":
            return torch.softmax(logits, dim=-1)
        s = torch.sigmoid(logits)  # sigmoid routers (DeepSeek-V3): normalised to sum to 1
        return s / s.sum(dim=-1, keepdim=True).clamp_min(1e-20)


@dataclass
class GateCapture:
    """Gate scores captured during forward passes, per MoE layer.

    ``scores[l]`` is (tokens, num_experts) G_e(x); ``routed[l]`` is (tokens, top_k) expert ids.
    Padding tokens are dropped when an attention mask of matching size was given.
    ``expert_rows[l]`` is (num_experts,): how many token rows each expert computed, padding
    included (the expert kernels run on every row of the batch); it feeds the cost model.
    """

    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    routed: dict[int, torch.Tensor] = field(default_factory=dict)
    token_mask: torch.Tensor | None = None
    expert_rows: dict[int, torch.Tensor] = field(default_factory=dict)

    def _add(self, layer: MoELayer, output: Any) -> None:
        logits, index = layer.decode(output)
        g = layer.scores(logits)  # (T, E)
        idx = index.detach().reshape(g.shape[0], -1)  # (T, k)
        flat = idx.reshape(-1)
        rows = torch.bincount(flat[(flat >= 0) & (flat < layer.num_experts)],
                              minlength=layer.num_experts).cpu()  # (E,) padding included
        prev = self.expert_rows.get(layer.layer_idx)
        self.expert_rows[layer.layer_idx] = rows if prev is None else prev + rows
        if self.token_mask is not None and self.token_mask.numel() == g.shape[0]:
            g, idx = g[self.token_mask], idx[self.token_mask]
        if layer.layer_idx in self.scores:  # several forward passes inside one capture
            g = torch.cat([self.scores[layer.layer_idx], g])
            idx = torch.cat([self.routed[layer.layer_idx], idx])
        self.scores[layer.layer_idx] = g
        self.routed[layer.layer_idx] = idx


class MoEModel:
    """A supported MoE model seen as (layers, experts, gates, shared parts).

    Args:
        module: the runnable model (``module(**batch)`` returns an output with ``.loss``).
        family: model family name (``hfedmoe models``).
        task: ``"classification"``, ``"causal-lm"`` or ``"seq2seq"`` (an encoder-decoder's
            text-to-text model; its MoE layers are the encoder's then the decoder's).
        layers: the MoE layers in forward order.
        shared: canonical-path -> module of the shared trainable parts (e.g. the task head).
        info: free-form facts for ``hfedmoe models inspect``.
    """

    def __init__(self, module: nn.Module, family: str, task: str, layers: list[MoELayer],
                 shared: Mapping[str, nn.Module] | None = None, tokenizer: Any = None,
                 info: Mapping[str, Any] | None = None) -> None:
        if not layers:
            raise ModelError(f"{family}: the model has no MoE layer")
        self.module = module
        self.family = family
        self.task = task
        self.layers = layers
        self.tokenizer = tokenizer
        self.info = dict(info or {})
        self._params: dict[str, nn.Parameter] = {}
        for layer in layers:
            for e, expert in enumerate(layer.bank.experts):
                for name, p in expert.named_parameters():
                    self._params[expert_key(layer.layer_idx, e, name)] = p
            for name, p in layer.gate_parameters().items():
                self._params[gate_key(layer.layer_idx, name)] = p
        for path, mod in (shared or {}).items():
            for name, p in mod.named_parameters():
                self._params[shared_key(f"{path}.{name}")] = p
        # canonical key of a frozen base weight that may carry LoRA factors -> its linear
        # (shared experts' projections, targeted attention; hfedmoe.models.lora_targets)
        self.lora_bases: dict[str, nn.Module] = {}
        self.lora_only: set[str] = set()  # keys that never train in full (attention targets)
        self.set_trainable(())

    def require_tokenizer(self) -> Any:
        """The model's tokenizer; a :class:`ModelError` saying so when it has none (a
        checkpoint directory without tokenizer files: the kit downloads nothing)."""
        if self.tokenizer is None:
            source = self.info.get("source", self.family)
            why = self.info.get("tokenizer", "none")
            raise ModelError(
                f"{source}: the model has no tokenizer ({why}); save its tokenizer into the "
                "checkpoint directory (tokenizer.save_pretrained(dir)), or use a registered "
                "'<family>-tiny' model, which brings an offline byte-level tokenizer")
        return self.tokenizer

    # --- structure -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def top_k(self) -> int:
        return self.layers[0].top_k

    def expert_ids(self) -> list[ExpertId]:
        return [ExpertId(layer.layer_idx, e) for layer in self.layers
                for e in range(layer.num_experts)]

    def layer(self, layer_idx: int) -> MoELayer:
        if not 0 <= layer_idx < len(self.layers):
            raise ModelError(f"MoE layer {layer_idx} out of range [0, {len(self.layers)})")
        return self.layers[layer_idx]

    def keys(self) -> list[str]:
        """Every canonical key: experts, gates and shared parts."""
        return list(self._params)

    def spec(self) -> dict[str, tuple[int, ...]]:
        """Canonical key -> shape; what a sparse update is validated against."""
        return {k: tuple(p.shape) for k, p in self._params.items()}

    def parameter(self, key: str) -> nn.Parameter:
        try:
            return self._params[key]
        except KeyError:
            parse_key(key)  # raises for a malformed key
            raise ModelError(f"{self.family}: no parameter {key!r}") from None

    # --- reading and writing by canonical name ---------------------------------------------
    def expert_parameters(self, eid: ExpertId) -> dict[str, nn.Parameter]:
        """The parameters of expert ``eid`` by local name (``w_in``, ``w_out``, ...)."""
        return dict(self.layer(eid.layer_idx).bank.experts[eid.expert_idx].named_parameters())

    def expert_state(self, eid: ExpertId) -> dict[str, torch.Tensor]:
        layer = self.layer(eid.layer_idx)
        if not 0 <= eid.expert_idx < layer.num_experts:
            raise ModelError(f"expert {eid} out of range: layer has {layer.num_experts}")
        expert = layer.bank.experts[eid.expert_idx]
        return {expert_key(eid.layer_idx, eid.expert_idx, n): p.detach().clone()
                for n, p in expert.named_parameters()}

    def gate_state(self, layer_idx: int) -> dict[str, torch.Tensor]:
        return {gate_key(layer_idx, n): p.detach().clone()
                for n, p in self.layer(layer_idx).gate_parameters().items()}

    def shared_state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self._params.items() if k.startswith("shared.")}

    def state(self) -> dict[str, torch.Tensor]:
        """A detached copy of every canonical tensor (the federated global model)."""
        return {k: p.detach().clone() for k, p in self._params.items()}

    def load_state(self, state: Mapping[str, torch.Tensor], strict: bool = False) -> None:
        """Copy tensors into the model by canonical name; shapes must match exactly.

        A weight this model stores quantized (``model.quantize``, :mod:`hfedmoe.quantize`) is
        re-quantized from the value given, so a device's copy stays quantized across loads."""
        missing = set(self._params) - set(state)
        if strict and missing:
            raise ModelError(f"state is missing {len(missing)} key(s), e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for key, value in state.items():
                p = self.parameter(key)
                if tuple(value.shape) != tuple(p.shape):
                    raise ModelError(f"{key}: shape {tuple(value.shape)} != model {tuple(p.shape)}")
                if is_quantized(p) and key in self.lora_bases:
                    self.lora_bases[key].weight = self._params[key] = requantize(p, value)
                elif is_quantized(p):
                    self.replace_expert_weight(key, requantize(p, value))
                else:
                    p.copy_(value.to(p.dtype))

    def replace_expert_weight(self, key: str, param: nn.Parameter) -> None:
        """Put ``param`` in place of the expert weight ``key`` (e.g. its quantized form)."""
        pk = parse_key(key)
        old = self.parameter(key)
        if pk.kind != "expert" or pk.expert is None:
            raise ModelError(f"{key}: only expert weights can be replaced")
        if tuple(param.shape) != tuple(old.shape):
            raise ModelError(f"{key}: shape {tuple(param.shape)} != model {tuple(old.shape)}")
        expert = self.layer(pk.expert.layer_idx).bank.experts[pk.expert.expert_idx]
        setattr(expert, pk.param, param)
        self._params[key] = param

    def rebind_parameters(self, fresh: Mapping[int, nn.Parameter]) -> None:
        """Point every key whose tensor's ``id`` is in ``fresh`` at its new tensor (the
        network already holds them: :func:`hfedmoe.models.materialize.materialize`)."""
        for key, p in list(self._params.items()):
            if id(p) in fresh:
                self._params[key] = fresh[id(p)]

    def add_lora_base(self, path: str, linear: nn.Module, lora_only: bool) -> str:
        """List the weight of the base linear at module path ``path`` as a LoRA base under
        ``shared.{path}.weight`` (registered as a federated tensor if it is not one yet;
        ``lora_only``: it never trains in full). Returns the key."""
        key = shared_key(f"{path}.weight")
        self._params.setdefault(key, linear.weight)
        self.lora_bases[key] = linear
        if lora_only:
            self.lora_only.add(key)
            linear.weight.requires_grad_(False)
        return key

    def replace_base_linear(self, key: str, linear: nn.Module) -> None:
        """Put ``linear`` (e.g. its quantized form, already in the network) in place of the
        LoRA base ``key``'s linear."""
        if key not in self.lora_bases:
            raise ModelError(f"{key}: not a LoRA base of {self.family}")
        self.lora_bases[key] = linear
        self._params[key] = linear.weight

    def state_hash(self) -> str:
        """sha256 over the canonical state (sorted keys, shapes, raw bytes)."""
        h = hashlib.sha256()
        for key in sorted(self._params):
            t = dequantize_weight(self._params[key]).contiguous().cpu()
            h.update(f"{key}:{tuple(t.shape)};".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    # --- training subsets --------------------------------------------------------------------
    def set_trainable(self, experts: Iterable[ExpertId], gates: bool = True,
                      shared: bool = True) -> None:
        """Make exactly ``experts`` (plus gates/shared parts) trainable; freeze everything else."""
        wanted = set(experts)
        for eid in wanted:
            self.layer(eid.layer_idx)
            if not 0 <= eid.expert_idx < self.layers[eid.layer_idx].num_experts:
                raise ModelError(f"expert {eid} out of range")
        for p in self.module.parameters():
            p.requires_grad_(False)
        for key, p in self._params.items():
            pk = parse_key(key)
            if pk.kind == "expert":  # a quantized (frozen base) weight never trains
                p.requires_grad_(pk.expert in wanted and not is_quantized(p))
            elif pk.kind == "gate":
                p.requires_grad_(gates)
            else:
                p.requires_grad_(shared and key not in self.lora_only)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self._params.items() if p.requires_grad}

    def set_expert_impl(self, impl: str, detach_frozen: bool | None = None,
                        capacity_factor: float | None = None) -> None:
        """Every bank's expert path (``hfedmoe.experts``); ``detach_frozen`` and
        ``capacity_factor`` (the ``"capacity"`` path's) are set too when given. Clears the
        banks' drop counts (:meth:`capacity_drops`)."""
        for layer in self.layers:
            layer.bank.impl = impl
            layer.bank.dropped_pairs = layer.bank.routed_pairs = None
            if detach_frozen is not None:
                layer.bank.detach_frozen = detach_frozen
            if capacity_factor is not None:
                layer.bank.capacity_factor = capacity_factor

    def capacity_drops(self) -> tuple[int, int]:
        """``(dropped, routed)`` token-expert pairs of the last ``"capacity"`` forward, summed
        over the layers (``ExpertBank.dropped_pairs``/``routed_pairs``; layers that have not
        run the path count 0)."""
        dropped = routed = 0
        for layer in self.layers:
            if layer.bank.dropped_pairs is not None and layer.bank.routed_pairs is not None:
                dropped += int(layer.bank.dropped_pairs)
                routed += int(layer.bank.routed_pairs)
        return dropped, routed

    # --- gate scores -------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self, attention_mask: torch.Tensor | None = None) -> Iterator[GateCapture]:
        """Record G_e(x) (Eq. 3-16 input) of every token at every MoE layer while inside."""
        cap = GateCapture(token_mask=None if attention_mask is None
                          else attention_mask.reshape(-1).bool())
        handles = [(layer.router if layer.tap is None else layer.tap).register_forward_hook(
            lambda _m, _i, out, layer=layer: cap._add(layer, out)) for layer in self.layers]
        try:
            yield cap
        finally:
            for h in handles:
                h.remove()

    # --- sizes -------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Layers, experts per layer, top-k, parameters per expert, total vs active."""
        total = sum(p.numel() for p in self.module.parameters())
        expert_total = sum(layer.num_experts * layer.bank.shape.params_per_expert
                           for layer in self.layers)
        active_experts = sum(layer.top_k * layer.bank.shape.params_per_expert
                             for layer in self.layers)
        return {
            "family": self.family,
            "task": self.task,
            "moe_layers": self.num_layers,
            "experts_per_layer": [layer.num_experts for layer in self.layers],
            "top_k": [layer.top_k for layer in self.layers],
            "params_per_expert": [layer.bank.shape.params_per_expert for layer in self.layers],
            "expert_shape": [f"{layer.bank.shape.d_model}x{layer.bank.shape.d_ff}"
                             f"{' gated' if layer.bank.shape.gated else ''}"
                             f" {layer.bank.shape.activation}" for layer in self.layers],
            "total_params": total,
            "expert_params": expert_total,
            "active_params_per_token": total - expert_total + active_experts,
            "federated_keys": len(self._params),
            **self.info,
        }

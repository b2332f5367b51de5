"""Which frozen linears of a model's base may carry LoRA factors (``train.adapter = "lora"``).

Besides the selected experts (:mod:`hfedmoe.lora`), a LoRA round adapts:

- **shared experts** (the MoE blocks' ``*shared*`` children, e.g. Qwen2-MoE's
  ``shared_expert``, DeepSeek's ``shared_experts``): every ``nn.Linear`` in them whose weight
  is a matrix (both dimensions > 1) is a LoRA base (:func:`add_shared_expert_bases`). They are
  federated tensors (``shared.*`` keys) that train in full with ``train.adapter = "full"``; in
  a LoRA round they stay frozen and carry factors. What is genuinely small (a shared expert's
  (1, d) scalar gate) trains in full either way, like the routers;
- **targets** named by ``model.lora_targets`` (:func:`add_lora_targets`): ``"attention"`` (every
  linear under a module whose name holds ``attn``/``attention``) or a module name or a path
  suffix (``"q_proj"``, ``"self_attn.v_proj"``). They become federated tensors
  (``shared.{path}.weight``) that never train in full: frozen in a full round, factors in a
  LoRA round. A target that matches no linear of the model is a :class:`ModelError` naming the
  projections the model has.

Either way the update carries the factors (``{key}.lora_A``/``lora_B``), never the weight, and
no base weight holds optimizer state; the server merges the exact product ``scale * B A``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from hfedmoe.errors import ModelError
from hfedmoe.models.base import MoEModel

ATTENTION = "attention"
_ATTENTION_MARKS = ("attn", "attention")

__all__ = ["ATTENTION", "add_lora_targets", "add_shared_expert_bases", "attention_linears"]


def add_shared_expert_bases(model: MoEModel, parts: Mapping[str, nn.Module]) -> list[str]:
    """List the matrix weights of the shared-expert ``parts`` (canonical path -> module) as
    LoRA bases of ``model``; their keys."""
    keys = []
    for path, part in parts.items():
        for name, sub in part.named_modules():
            if isinstance(sub, nn.Linear) and min(sub.weight.shape) > 1:
                keys.append(model.add_lora_base(f"{path}.{name}" if name else path, sub,
                                                lora_only=False))
    return keys


def _free_linears(model: MoEModel) -> list[tuple[str, nn.Linear]]:
    """The model's linears whose weight is not federated yet and not tied to another tensor."""
    federated = {id(model.parameter(k)) for k in model.keys()}
    uses: dict[int, int] = {}
    for _, p in model.module.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return [(path, mod) for path, mod in model.module.named_modules()
            if isinstance(mod, nn.Linear) and id(mod.weight) not in federated
            and uses.get(id(mod.weight), 0) == 1]


def _is_attention(path: str) -> bool:
    return any(mark in part.lower() for part in path.split(".")[:-1] for mark in _ATTENTION_MARKS)


def attention_linears(model: MoEModel) -> list[str]:
    """Module paths of the model's attention projections (free linears under an attention
    module)."""
    return [path for path, _ in _free_linears(model) if _is_attention(path)]


def _matches(target: str, path: str) -> bool:
    if target == ATTENTION:
        return _is_attention(path)
    return path == target or path.endswith(f".{target}")


def add_lora_targets(model: MoEModel, targets: Iterable[str]) -> list[str]:
    """Register the linears ``targets`` names as LoRA-only bases of ``model``; their keys.

    Raises:
        ModelError: a target that matches no free linear of the model, naming the model's
            attention projections.
    """
    targets = list(targets)
    if not targets:
        return []
    free = _free_linears(model)
    keys = []
    for target in targets:
        hits = [(path, mod) for path, mod in free if _matches(target, path)]
        if not hits:
            names = sorted({p.rsplit(".", 1)[-1] for p, _ in free if _is_attention(p)})
            raise ModelError(
                f"model.lora_targets: {target!r} matches no linear layer of {model.family} "
                f"outside its experts, routers and shared parts; its attention projections "
                f"are: {', '.join(names) or '(none)'} (or name them all with "
                f"{ATTENTION!r})")
        keys += [model.add_lora_base(path, mod, lora_only=True) for path, mod in hits]
    return sorted(set(keys))

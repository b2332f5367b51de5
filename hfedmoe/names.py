"""Canonical parameter names: the keys of sparse updates, checkpoints and aggregation.

Every supported model, whatever its own module paths, is seen through three kinds of keys::

    layers.{layer_idx}.experts.{expert_idx}.{param}   one expert's slice of an MoE layer
    layers.{layer_idx}.gate.{param}                   the router (gate) of an MoE layer
    shared.{path}                                     other trainable parts (task head, ...)

``layer_idx`` counts MoE layers only (0..L-1 in forward order), so keys are the same for any
family. A key missing from an update means "not trained here", never "zero delta".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from hfedmoe.errors import ModelError

KeyKind = Literal["expert", "gate", "shared"]

_EXPERT = re.compile(r"^layers\.(\d+)\.experts\.(\d+)\.([A-Za-z0-9_.]+)$")
_GATE = re.compile(r"^layers\.(\d+)\.gate\.([A-Za-z0-9_.]+)$")
_SHARED = re.compile(r"^shared\.([A-Za-z0-9_.]+)$")


@dataclass(frozen=True, order=True)
class ExpertId:
    """One expert of the pool E = {E_(l,s)}: MoE layer ``layer_idx``, expert ``expert_idx``."""

    layer_idx: int
    expert_idx: int

    def __str__(self) -> str:
        return f"{self.layer_idx}:{self.expert_idx}"

    @classmethod
    def parse(cls, text: str) -> ExpertId:
        """Inverse of ``str()``: ``"3:5"`` -> ``ExpertId(3, 5)``."""
        try:
            layer, expert = text.split(":")
            out = cls(int(layer), int(expert))
        except (ValueError, AttributeError) as exc:
            raise ModelError(f"not an expert id (want 'layer:expert'): {text!r}") from exc
        if out.layer_idx < 0 or out.expert_idx < 0:
            raise ModelError(f"negative expert id: {text!r}")
        return out


@dataclass(frozen=True)
class ParamKey:
    """A parsed canonical key."""

    kind: KeyKind
    param: str
    layer_idx: int | None = None
    expert_idx: int | None = None

    @property
    def expert(self) -> ExpertId | None:
        if self.kind != "expert":
            return None
        assert self.layer_idx is not None and self.expert_idx is not None
        return ExpertId(self.layer_idx, self.expert_idx)


def expert_key(layer_idx: int, expert_idx: int, param: str) -> str:
    return f"layers.{layer_idx}.experts.{expert_idx}.{param}"


def gate_key(layer_idx: int, param: str) -> str:
    return f"layers.{layer_idx}.gate.{param}"


def shared_key(path: str) -> str:
    return f"shared.{path}"


def parse_key(key: str) -> ParamKey:
    """Parse a canonical key; raise :class:`ModelError` if it is not one."""
    if m := _EXPERT.fullmatch(key):
        return ParamKey("expert", m.group(3), int(m.group(1)), int(m.group(2)))
    if m := _GATE.fullmatch(key):
        return ParamKey("gate", m.group(2), int(m.group(1)))
    if m := _SHARED.fullmatch(key):
        return ParamKey("shared", m.group(1))
    raise ModelError(f"not a canonical parameter name: {key!r}")

"""Adapters exposing any supported MoE model as (layers, experts, gates, shared parts).

Names are imported lazily so that ``hfedmoe.models.cli`` (and ``hfedmoe --help``) does not pull
in torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "GateCapture": "hfedmoe.models.base", "MoELayer": "hfedmoe.models.base",
    "MoEModel": "hfedmoe.models.base", "DEFAULT_MODEL": "hfedmoe.models.registry",
    "build_model": "hfedmoe.models.registry", "model_names": "hfedmoe.models.registry",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hfedmoe.models' has no attribute {name!r}")

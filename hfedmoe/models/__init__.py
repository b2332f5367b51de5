"""Adapters exposing any supported MoE model as (layers, experts, gates, shared parts)."""

from hfedmoe.models.base import GateCapture, MoELayer, MoEModel
from hfedmoe.models.registry import DEFAULT_MODEL, build_model, model_names

__all__ = ["DEFAULT_MODEL", "GateCapture", "MoELayer", "MoEModel", "build_model", "model_names"]

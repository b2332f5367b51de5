"""The global model as content-addressed shards, so a device fetches only what it lacks.

The canonical state is cut into shards: one per expert (``layers.{l}.experts.{e}``), one per
gate (``layers.{l}.gate``) and one for the shared parts (``shared``). Each shard is a
safetensors blob (sorted keys, no metadata) named by its sha256. A round announcement carries a
:class:`~hfedmoe.protocol.ModelManifest` (group -> sha); a device keeps a :class:`ShardCache` of every shard it has
seen or computed from its own copy of the base model, and asks the server only for the shas it
lacks. After a round of HFedMoE only the aggregated experts, the gates and the head change, so
a device downloads a small fraction of the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hfedmoe.errors import ModelError, WireError
from hfedmoe.names import parse_key
from hfedmoe.protocol import ModelManifest, manifest_hash


def group_of(key: str) -> str:
    """The shard a canonical key belongs to."""
    pk = parse_key(key)
    if pk.kind == "expert":
        return f"layers.{pk.layer_idx}.experts.{pk.expert_idx}"
    if pk.kind == "gate":
        return f"layers.{pk.layer_idx}.gate"
    return "shared"


def shard_blob(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Deterministic bytes of one shard."""
    return st_save({k: tensors[k].detach().contiguous().cpu().float() for k in sorted(tensors)})


def split_state(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        groups.setdefault(group_of(key), {})[key] = value
    return groups


def build_shards(state: Mapping[str, torch.Tensor]) -> tuple[ModelManifest, dict[str, bytes]]:
    """Shard a canonical state: the manifest and sha -> blob."""
    blobs: dict[str, bytes] = {}
    shards: dict[str, str] = {}
    for group, tensors in split_state(state).items():
        blob = shard_blob(tensors)
        sha = hashlib.sha256(blob).hexdigest()
        blobs[sha] = blob
        shards[group] = sha
    return ModelManifest(manifest_hash(shards), shards), blobs


class ShardCache:
    """A device's shards by sha; validated against the model's key shapes when added."""

    def __init__(self, spec: Mapping[str, tuple[int, ...]], max_entries: int = 100_000) -> None:
        self.spec = dict(spec)
        self.max_entries = max_entries
        self._shards: dict[str, dict[str, torch.Tensor]] = {}

    def __contains__(self, sha: str) -> bool:
        return sha in self._shards

    def __len__(self) -> int:
        return len(self._shards)

    def add_state(self, state: Mapping[str, torch.Tensor]) -> ModelManifest:
        """Add every shard of a local state (e.g. the base model); returns its manifest."""
        manifest, blobs = build_shards(state)
        for sha, blob in blobs.items():
            self._shards.setdefault(sha, dict(st_load(blob)))
        return manifest

    def add_blob(self, blob: bytes, expected_sha: str | None = None) -> str:
        """Verify and add one shard received from the server; returns its sha."""
        sha = hashlib.sha256(blob).hexdigest()
        if expected_sha is not None and sha != expected_sha:
            raise WireError(f"shard hash mismatch: got {sha[:12]}, expected {expected_sha[:12]}")
        try:
            tensors = dict(st_load(bytes(blob)))
        except Exception as exc:  # safetensors raises its own error types
            raise WireError(f"shard {sha[:12]} is not valid safetensors: {exc}") from exc
        for key, t in tensors.items():
            if key not in self.spec:
                raise WireError(f"shard {sha[:12]}: unknown key {key!r}")
            if tuple(t.shape) != self.spec[key]:
                raise WireError(f"shard {sha[:12]}: {key} has shape {tuple(t.shape)}, "
                                f"model has {self.spec[key]}")
            if not torch.isfinite(t).all():
                raise WireError(f"shard {sha[:12]}: {key} holds NaN/Inf")
        if len(self._shards) >= self.max_entries:
            self._shards.pop(next(iter(self._shards)))
        self._shards[sha] = tensors
        return sha

    def nbytes(self, shas: Iterable[str]) -> int:
        """Tensor bytes of the given shards."""
        return sum(t.numel() * t.element_size() for s in shas for t in self._shards[s].values())

    def missing(self, manifest: ModelManifest) -> list[str]:
        return sorted({sha for sha in manifest.shards.values() if sha not in self._shards})

    def assemble(self, manifest: ModelManifest) -> dict[str, torch.Tensor]:
        """The full canonical state of ``manifest`` (every shard must be present)."""
        lacking = self.missing(manifest)
        if lacking:
            raise ModelError(f"{len(lacking)} shard(s) missing, e.g. {lacking[0][:12]}")
        state: dict[str, torch.Tensor] = {}
        for sha in manifest.shards.values():
            state.update(self._shards[sha])
        return state


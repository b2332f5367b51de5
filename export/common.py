"""What every export shares: example inputs, reports, program keys (no executorch/onnx here)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hfedmoe.data.tokenization import IGNORE_INDEX
from hfedmoe.errors import ExportError
from hfedmoe.models.base import MoEModel


def vocab_size(model: MoEModel) -> int:
    """The token vocabulary of the model's input embedding."""
    module = model.module
    for mod in (module, getattr(module, "backbone", None)):
        emb = getattr(mod, "get_input_embeddings", None)
        if emb is not None:
            return int(emb().num_embeddings)
    raise ExportError(f"{model.family}: cannot find the input embedding")


def example_inputs(model: MoEModel, batch: int, seq: int, seed: int = 0,
                   num_labels: int | None = None) -> dict[str, torch.Tensor]:
    """Random token ids, an attention mask with padding on the last row, and labels.

    A causal LM's labels are :func:`causal_lm_labels`; a classifier's are (B,) class ids.
    """
    if batch < 1 or seq < 2:
        raise ExportError(f"need batch >= 1 and seq >= 2, got batch={batch} seq={seq}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size(model), (batch, seq), generator=g)  # (B, S)
    mask = torch.ones(batch, seq, dtype=torch.long)  # (B, S)
    if batch > 1:
        mask[-1, seq // 2 + 1:] = 0
        ids[-1, seq // 2 + 1:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if model.task == "causal-lm":
        out["labels"] = causal_lm_labels(ids, mask)
        return out
    labels = num_labels or model.info.get("num_labels") or _num_labels(model)
    if labels:
        out["labels"] = torch.randint(0, labels, (batch,), generator=g)
    return out


def causal_lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     prompt: float = 0.25) -> torch.Tensor:
    """Labels of a causal-LM batch shaped like :func:`hfedmoe.data.tokenization.causal_lm_batch`'s:
    the token ids, ``-100`` (no loss) on the first ``prompt`` fraction of every row (at least
    one token: a prompt) and on padding, so the loss is on the "response" only."""
    labels = input_ids.clone()  # (B, S)
    labels[:, :max(1, int(prompt * input_ids.shape[1]))] = IGNORE_INDEX
    return labels.masked_fill(attention_mask == 0, IGNORE_INDEX)


def label_shape(model: MoEModel, batch: int, seq: int) -> tuple[int, ...]:
    """Shape of a training program's ``labels`` input: (B, S) for a causal LM, else (B,)."""
    return (batch, seq) if model.task == "causal-lm" else (batch,)


def _num_labels(model: MoEModel) -> int | None:
    head = getattr(model.module, "classifier", None)
    return int(head.out_features) if isinstance(head, torch.nn.Linear) else None


def program_key(model: MoEModel, kind: str, **shape: Any) -> str:
    """Cache key of an exported program: model state hash + kind + shapes/options."""
    spec = json.dumps({"model": model.state_hash(), "kind": kind, **shape}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:24]


@dataclass
class ExportReport:
    """What an export produced: size, trainable parameters, parity against eager PyTorch."""

    kind: str  # "pte", "onnx", "train-pte"
    path: str | None
    size_bytes: int
    trainable_params: int
    parity: dict[str, float] = field(default_factory=dict)  # check -> max |diff|
    tolerance: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(v <= self.tolerance for v in self.parity.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def format(self) -> str:
        lines = [f"{self.kind}: {self.path or '(in memory)'}",
                 f"  size               {self.size_bytes:,} bytes ({self.size_bytes / 2**20:.2f} MiB)",
                 f"  trainable params   {self.trainable_params:,}"]
        for k, v in self.info.items():
            lines.append(f"  {k:<18} {v}")
        for check, diff in self.parity.items():
            verdict = "ok" if diff <= self.tolerance else "FAIL"
            lines.append(f"  parity {check:<11} max|diff| {diff:.3e} (tol {self.tolerance:.0e}) "
                         f"{verdict}")
        return "\n".join(lines)

"""Training with the ExecuTorch runtime, with the same sparse update format as eager training.

:class:`ExecuTorchTrainer` gets (or exports and caches) the training program of the smallest
bucket that holds the selected experts, loads it with ExecuTorch's training runtime, writes the
selected experts' current weights into the program's slots, and runs SGD steps. ``deltas()``
returns ``trained - initial`` under canonical names (``layers.{l}.experts.{e}.w_in``,
``layers.{l}.gate.weight``, ``shared.classifier.weight``, ...) for exactly the trained
parameters, like an eager device would send.

With ``lora`` (``train.adapter = "lora"``) the program is the LoRA variant
(:class:`~export.programs.LoRATrainingProgram`): its slots are the selected experts' LoRA
factors, initialised like :class:`hfedmoe.lora.ExpertFactors` (A Kaiming-uniform from a
generator seeded with ``seed``, drawn in sorted expert order as the eager trainer does; B
zero), and ``deltas()`` returns the trained factors themselves under the canonical LoRA keys
(``layers.{l}.experts.{e}.w_in.lora_A`` ...), which :func:`hfedmoe.lora.expand` turns into
dense deltas on the server, plus bias, gate and shared-part deltas.

Programs are keyed by (model state hash, bucket, batch shape, mode, backend[, LoRA rank and
alpha][, capacity factor]): one program serves
every device of that bucket in a round, whatever its experts (see :mod:`export.programs`). A
device with budget ``n`` selects at most ``bucket_for(n)`` experts (budget 3 -> bucket 2: round
down, never above the budget).

Expert compute: by default the program runs the ``"dense"`` path, every expert of a layer on
every token of the batch (E/k times the routed work). With ``capacity_factor=f`` it runs the
``"capacity"`` path instead: each expert on a fixed block of ``min(T, ceil(f * T * k / E))``
rows, about ``f * k / E`` of the dense work, and token-expert pairs past an expert's capacity
are dropped (first come first served in token order), so the forward is the model's only when
nothing is dropped (``f >= E / k``). The eager reference of such a program runs the same path
(:mod:`export.training`).

Cost of the generic slots: the program builds every layer's expert weights from the slots each
step (one (E, bucket) x (bucket, numel) matmul per layer and parameter), small next to the
expert compute.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from export.common import label_shape
from export.executorch import (
    Backend,
    TrainingExport,
    export_training_program,
    load_training,
    training_key,
)
from export.programs import BUCKETS, DropMode, flat_expert_index
from hfedmoe.errors import ExportError
from hfedmoe.lora import ExpertFactors, LoRASpec, split_factor_key
from hfedmoe.models.base import MoEModel
from hfedmoe.names import ExpertId, expert_key
from hfedmoe.round_stats import RoundAccumulator

log = logging.getLogger(__name__)


def bucket_holding(num_experts: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket with room for ``num_experts`` experts."""
    for b in sorted(buckets):
        if b >= num_experts:
            return b
    raise ExportError(f"{num_experts} experts exceed the largest bucket {max(buckets)}")


class ProgramCache:
    """Training programs by key, in memory and optionally in ``directory`` (.pte + .json)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._mem: dict[str, TrainingExport] = {}

    def get(self, model: MoEModel, bucket: int, batch: int, seq: int, mode: DropMode = "frozen",
            backend: Backend = "portable", gates: bool = True,
            shared: bool = True, lora: LoRASpec | None = None,
            capacity_factor: float | None = None) -> TrainingExport:
        key = training_key(model, bucket, batch, seq, mode, backend, gates, shared, lora,
                           capacity_factor)
        if key in self._mem:
            return self._mem[key]
        found = self._load(key)
        if found is None:
            found = export_training_program(model, bucket, batch, seq, mode, backend,
                                            gates, shared, lora, capacity_factor)
            log.info("exported training program %s (bucket %d, %d bytes, %.1f s)", key,
                     bucket, len(found.buffer), found.export_s)
            self._save(found)
        self._mem[key] = found
        return found

    def _load(self, key: str) -> TrainingExport | None:
        if self.directory is None:
            return None
        pte, meta = self.directory / f"{key}.pte", self.directory / f"{key}.json"
        if not (pte.is_file() and meta.is_file()):
            return None
        return TrainingExport(buffer=pte.read_bytes(), **json.loads(meta.read_text()))

    def _save(self, exp: TrainingExport) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in asdict(exp).items() if k != "buffer"}
        (self.directory / f"{exp.key}.pte").write_bytes(exp.buffer)
        (self.directory / f"{exp.key}.json").write_text(json.dumps(meta, indent=1))


_DEFAULT_CACHE = ProgramCache()


class ExecuTorchTrainer:
    """SGD on the selected experts (plus gates and shared head) inside an ExecuTorch program.

    Args:
        model: the global model (its current weights are the program's starting point).
        experts: the experts this device trains; at most the largest bucket.
        batch_shape: (batch, seq) of every batch given to :meth:`step`.
        lr: SGD learning rate (no momentum, no weight decay).
        bucket: program bucket; default the smallest that holds ``experts``.
        mode: ``"frozen"`` (other experts are constants; forward equals the model) or
            ``"dropped"`` (other experts removed and masked out of routing).
        backend: ``"portable"`` or ``"xnnpack"`` kernels.
        cache: where programs are kept; default a process-wide in-memory cache.
        lora: train LoRA factors of ``experts`` (the LoRA program; frozen mode only) instead
            of their weights.
        seed: seed of the generator the LoRA A factors are drawn from (the eager trainer's
            rule: ``torch.Generator().manual_seed(seed)``, experts in sorted order).
        capacity_factor: run the experts on the ``"capacity"`` path with this factor (None:
            the exact ``"dense"`` path; see the module docstring).
        write_back: :meth:`deltas` also writes the trained weights (not LoRA factors) into
            ``model``, which then holds what trained as after eager training (a round's
            recipe); False leaves ``model`` as it was (the parity checks).

    It follows :class:`hfedmoe.trainer.Trainer`: one expert set for the round (no per-batch
    reselection); the program does not expose its gates, so :attr:`acc` stays empty and a
    round's usage and importance come from its routing pass; SGD holds no state beyond the
    set's slots (:attr:`max_state_experts` is the set's size once a step ran).
    """

    device = torch.device("cpu")

    def __init__(self, model: MoEModel, experts: Sequence[ExpertId], batch_shape: tuple[int, int],
                 lr: float, *, bucket: int | None = None, mode: DropMode = "frozen",
                 backend: Backend = "portable", gates: bool = True, shared: bool = True,
                 cache: ProgramCache | None = None, lora: LoRASpec | None = None,
                 seed: int = 0, capacity_factor: float | None = None,
                 write_back: bool = False) -> None:
        from executorch.extension.training import get_sgd_optimizer

        self.model = model
        self.experts = list(experts)
        self.lora = lora
        self.seed = seed
        self.batch_shape = (int(batch_shape[0]), int(batch_shape[1]))
        self.bucket = bucket or bucket_holding(len(self.experts))
        self.index = flat_expert_index(model, self.experts, self.bucket)  # (bucket,)
        self.capacity_factor = capacity_factor
        self.program = (cache or _DEFAULT_CACHE).get(model, self.bucket, *self.batch_shape,
                                                     mode, backend, gates, shared, lora,
                                                     capacity_factor)
        self.module = load_training(self.program.buffer)
        self._prime()
        self._params = self.module.named_parameters()
        self._slots = self.program.slot_map()  # slot tensor -> key suffix under an expert
        self._write_initial()
        self.initial = self._current()
        self.optimizer = get_sgd_optimizer(self._params, lr, 0, 0, 0, False)
        self.steps = 0
        self.write_back = write_back
        self.active = frozenset(self.experts)
        self.trained: set[ExpertId] = set()
        self.acc = RoundAccumulator()  # the program's gates are not visible: stays empty
        self.phases: list[dict[str, float]] = []
        self.max_state_experts = 0

    def _prime(self) -> None:
        # ExecuTorch's TrainingModule exposes its parameter tensors only after a first
        # forward_backward; run one on a dummy batch (no optimizer step follows it).
        ids = torch.zeros(self.batch_shape, dtype=torch.long)
        labels = torch.zeros(label_shape(self.model, *self.batch_shape), dtype=torch.long)
        self.module.forward_backward("forward", (ids, torch.ones_like(ids), labels, self.index))

    def initial_factors(self) -> dict[str, torch.Tensor]:
        """The LoRA factors the round starts from, by canonical key: exactly those of
        :class:`hfedmoe.lora.ExpertFactors` drawn as the eager trainer draws them."""
        if self.lora is None:
            return {}
        gen = torch.Generator().manual_seed(self.seed)
        out: dict[str, torch.Tensor] = {}
        for eid in sorted(self.experts):
            params = self.model.expert_parameters(eid)
            factors = ExpertFactors(params["w_in"].detach(), params["w_out"].detach(), self.lora,
                                    gen)
            out.update({expert_key(eid.layer_idx, eid.expert_idx, n): t.detach()
                        for n, t in factors.factors.items()})
        return out

    def _write_initial(self) -> None:
        if (self.lora is None) != (self.program.lora is None) or \
                (self.lora is not None and self.lora != self.program.lora):
            raise ExportError(f"program adapter {self.program.adapter!r} "
                              f"(rank {self.program.lora_rank}) does not match {self.lora}")
        factors = self.initial_factors()
        with torch.no_grad():
            for sname, suffix in self._slots.items():
                slot = self._params[sname]
                slot.zero_()
                for b, eid in enumerate(self.experts):
                    key = expert_key(eid.layer_idx, eid.expert_idx, suffix)
                    src = factors[key] if key in factors else self.model.parameter(key)
                    slot[b].copy_(src.detach())
            for pname, key in self.program.canonical.items():
                self._params[pname].copy_(self.model.parameter(key).detach())

    def _current(self) -> dict[str, torch.Tensor]:
        """Canonical key -> current value of every trained parameter (a copy)."""
        out = {}
        for b, eid in enumerate(self.experts):
            for sname, suffix in self._slots.items():
                out[expert_key(eid.layer_idx, eid.expert_idx, suffix)] = \
                    self._params[sname][b].clone()
        for pname, key in self.program.canonical.items():
            out[key] = self._params[pname].clone()
        return out

    def step(self, batch: Mapping[str, torch.Tensor]) -> float:
        """One forward-backward and SGD step on ``batch`` (input_ids, attention_mask, labels)."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        if tuple(ids.shape) != self.batch_shape:
            raise ExportError(f"batch shape {tuple(ids.shape)} != program {self.batch_shape}; "
                              "pad or truncate to the program's shape")
        args = (ids.long(), mask.long(), batch["labels"].long(), self.index)
        out = self.module.forward_backward("forward", args)
        self.optimizer.step(self.module.named_gradients())
        self.steps += 1
        self.trained = set(self.experts)
        self.max_state_experts = len(self.experts)
        return float(out[0])

    def set_active(self, experts: frozenset[ExpertId]) -> None:
        """The program's expert set is fixed for the round: only the same set is accepted."""
        if frozenset(experts) != self.active:
            raise ExportError("an ExecuTorch training program trains one expert set per "
                              "round; per-batch reselection runs on the eager runtime")

    def logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The forward's logits (runs forward and backward, without an optimizer step)."""
        args = (batch["input_ids"].long(), batch["attention_mask"].long(),
                batch["labels"].long(), self.index)
        return self.module.forward_backward("forward", args)[1].clone()

    def trained_state(self) -> dict[str, torch.Tensor]:
        return self._current()

    def deltas(self) -> dict[str, torch.Tensor]:
        """``trained - initial`` by canonical key, for exactly the trained parameters; LoRA
        factors (``...w_in.lora_A`` etc.) are sent as their trained values, not as deltas
        (the server expands each pair to ``scale * B @ A``, :func:`hfedmoe.lora.expand`)."""
        now = self._current()
        out = {k: now[k] if split_factor_key(k) is not None else now[k] - self.initial[k]
               for k in self.initial}
        if self.write_back:
            self.model.load_state({k: self.model.parameter(k).detach() + d
                                   for k, d in out.items() if split_factor_key(k) is None})
        return out

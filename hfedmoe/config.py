"""Typed configuration: frozen dataclasses validated on construction, loaded from TOML.

Unknown keys are rejected with the full dotted path of the offending key; ``--set a.b=value``
overrides are parsed as TOML values (``--set method.beta=0.2``, ``--set model.name="qwen3-moe-tiny"``)
and fall back to a plain string when they are not valid TOML.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

if sys.version_info >= (3, 11):
    import tomllib  # novermin (guarded)
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

from hfedmoe.errors import ConfigError

T = TypeVar("T")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """Which MoE model to build and how.

    ``name`` is a registered model name (``hfedmoe models``) or a local checkpoint directory.
    """

    name: str = "minilm-moe"
    num_experts: int = 8  # upcycling: experts per converted FFN
    top_k: int = 2
    num_labels: int = 0  # 0: taken from the dataset
    upcycle: Literal["copy", "split", "moefy"] = "moefy"  # docs/method.md, "Experts that differ"
    router_jitter: float = 0.01  # std of the noise added to a fresh router's init (breaks ties)
    # a registered expert path (hfedmoe.experts); "sorted" is the fastest for training on CPU
    # (benchmarks/results/kernels.jsonl), "eager" the reference
    expert_impl: str = "sorted"
    max_length: int = 128
    seed: int = 0
    # a device's frozen base stored weight-only quantized (torchao; hfedmoe/quantize.py):
    # expert w_in/w_out and the other frozen nn.Linear weights; needs train.adapter = "lora".
    # The server keeps and aggregates fp32 whatever this says.
    quantize: Literal["none", "int8", "int4"] = "none"
    # base linears that carry LoRA factors in a LoRA round besides the selected experts and
    # the shared experts (hfedmoe.models.lora_targets): "attention" (every attention
    # projection) or module names / path suffixes ("q_proj", "self_attn.v_proj"). They never
    # train in full; a name that matches nothing is an error
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name must not be empty")
        _check(all(isinstance(t, str) and t.strip() for t in self.lora_targets),
               f"model.lora_targets must be non-empty names, got {list(self.lora_targets)}")
        _check(self.quantize in ("none", "int8", "int4"),
               f"model.quantize must be 'none', 'int8' or 'int4', got {self.quantize!r}")
        _check(self.num_experts >= 1, f"model.num_experts must be >= 1, got {self.num_experts}")
        _check(1 <= self.top_k <= self.num_experts,
               f"model.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        _check(self.num_labels >= 0, "model.num_labels must be >= 0")
        _check(self.router_jitter >= 0, "model.router_jitter must be >= 0")
        _check(8 <= self.max_length <= 4096, "model.max_length must be in [8, 4096]")
        _check(self.seed >= 0, f"model.seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class DataConfig:
    """Dataset source and its federated partition."""

    # "chatterbot", "fortunes" (apt-get install fortunes fortunes-min; directory overridable
    # with $HFEDMOE_FORTUNES_DIR) or a path to .jsonl/.csv/.parquet/a save_to_disk dir
    source: str = "chatterbot"
    task: Literal["classification", "causal-lm"] = "classification"
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    partition: Literal["dirichlet", "iid", "labels"] = "dirichlet"
    alpha: float = 0.5
    labels_per_client: int = 2
    test_fraction: float = 0.2
    # held out of the clients' pool after the test split (hfedmoe.data.task.load_task)
    validation_fraction: float = 0.0
    eval_split: Literal["test", "validation"] = "test"  # the split the server evaluates on
    # causal-lm: a prompt that leaves no room for its response within model.max_length is an
    # error naming it ("error"), or its pair is left out ("drop")
    long_prompts: Literal["error", "drop"] = "error"
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.alpha > 0, f"data.alpha must be > 0, got {self.alpha}")
        _check(self.labels_per_client >= 1, "data.labels_per_client must be >= 1")
        _check(0.0 < self.test_fraction < 1.0, "data.test_fraction must be in (0, 1)")
        _check(0.0 <= self.validation_fraction < 1.0,
               f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        _check(self.test_fraction + self.validation_fraction < 1.0,
               f"data.test_fraction + data.validation_fraction must be < 1 (training needs "
               f"examples), got {self.test_fraction} + {self.validation_fraction}")
        _check(self.eval_split in ("test", "validation"),
               f"data.eval_split must be 'test' or 'validation', got {self.eval_split!r}")
        _check(self.eval_split != "validation" or self.validation_fraction > 0,
               "data.eval_split = 'validation' needs data.validation_fraction > 0")
        _check(self.seed >= 0, f"data.seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class MethodConfig:
    """HFedMoE hyper-parameters (docs/method.md, "Defaults": lam is the paper's; beta and tau
    are changed from the paper's, with the evidence there)."""

    strategy: str = "hfedmoe"
    lam: float = 0.5  # Eq. 5
    beta: float = 3.0  # Eq. 14 (the paper: 0.1; docs/results.md, "signals")
    tau: float = 0.01  # Eq. 16-18 usage threshold (the paper's; docs/method.md, "Defaults")
    selection_key: Literal["ib", "importance"] = "ib"
    budget_scope: Literal["global", "per-layer"] = "global"
    per_layer_cap: int = 0  # 0: no cap
    # "raw": rank scores as computed; "standardized": per layer (score - mean) / std over the
    # layer's candidates before the global sort, so no layer wins by the scale of its router
    layer_scale: Literal["raw", "standardized"] = "standardized"
    # weight of the client-specificity term added to the standardized selection score: each
    # routed expert's share of the client's divergence from the global routing prior the server
    # announces, u_c(e) log(u_c(e) / u_global(e)) (docs/method.md, "Selection that reflects the
    # client"; 1 chosen on the validation split); 0 is the paper's rule (Eq. 15 on I_b alone)
    specificity: float = 1.0
    # Eq. 18-21 gate weights: "importance" alpha(c) as the paper; "importance-size" alpha(c) x
    # |D_c|; "data-size" |D_c| (FedAvg)
    gate_weighting: Literal["importance", "importance-size", "data-size"] = "importance"
    eps: float = 1e-12
    dp_clip: float = 0.0  # 0: differential privacy off
    dp_noise_multiplier: float = 0.0
    dp_delta: float = 1e-5  # the delta of the (epsilon, delta) each device's rounds spend
    dp_max_epsilon: float = 0.0  # a device stops taking part before passing it (0: no limit)
    seed: int = 0

    def __post_init__(self) -> None:
        _check(0.0 <= self.lam <= 1.0, f"method.lam must be in [0, 1], got {self.lam}")
        _check(self.beta >= 0.0, f"method.beta must be >= 0, got {self.beta}")
        _check(0.0 <= self.tau <= 1.0, f"method.tau must be in [0, 1], got {self.tau}")
        _check(self.per_layer_cap >= 0, "method.per_layer_cap must be >= 0")
        _check(math.isfinite(self.specificity) and self.specificity >= 0,
               f"method.specificity must be a finite number >= 0, got {self.specificity}")
        _check(self.gate_weighting in ("importance", "importance-size", "data-size"),
               f"method.gate_weighting must be importance, importance-size or data-size, "
               f"got {self.gate_weighting!r}")
        _check(self.eps > 0, "method.eps must be > 0")
        _check(self.dp_clip >= 0 and self.dp_noise_multiplier >= 0,
               "method.dp_clip and method.dp_noise_multiplier must be >= 0")
        _check(not (self.dp_noise_multiplier > 0 and self.dp_clip == 0),
               "method.dp_noise_multiplier needs method.dp_clip > 0 (noise is scaled by the clip norm)")
        _check(0.0 < self.dp_delta < 1.0, f"method.dp_delta must be in (0, 1), got {self.dp_delta}")
        _check(self.dp_max_epsilon >= 0, "method.dp_max_epsilon must be >= 0 (0: no limit)")
        _check(not (self.dp_max_epsilon > 0 and self.dp_noise_multiplier == 0),
               "method.dp_max_epsilon needs method.dp_noise_multiplier > 0 (without noise "
               "every round spends an infinite epsilon)")
        _check(self.seed >= 0, f"method.seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class TrainConfig:
    """The local fine-tuning recipe."""

    batch_size: int = 8
    lr: float = 1e-3  # experts and gates (pretrained or converted); benchmarks/lr_sweep.py
    head_lr: float = 3e-2  # shared parts such as a new classification head (0: lr)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    local_epochs: int = 1
    max_steps: int = 0  # 0: no limit besides epochs and the deadline
    # bf16/fp16: autocast, with fp32 masters for what trains
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # with dtype bf16/fp16: hold the frozen matmul weights in that dtype for the round instead
    # of casting them on every use (hfedmoe.precision; back in fp32, unchanged, after it). No
    # faster on the CPU measured (benchmarks/precision.py), so off by default
    hold_frozen_lowp: bool = False
    detach_frozen: bool = False
    device: str = "auto"
    threads: int = 0  # 0: what was measured / torch default
    # the round's routing pass: batches sampled to choose the round's experts (0: all)
    selection_batches: int = 4
    # "round": one expert set per round (default); "batch": per-batch Eq. 15, union <= budget
    reselect: Literal["round", "batch"] = "round"
    # when the window cannot fit every step with this many experts, train fewer steps instead
    min_experts: int = 1
    # "full": the selected experts' weights train; "lora": rank-r factors on their w_in/w_out
    # (delta W = lora_alpha / lora_rank * B A; hfedmoe.lora) and on the model's LoRA bases
    # (shared experts, model.lora_targets; hfedmoe.models.lora_targets); biases, gates and what
    # is genuinely small train as in "full". "auto": "lora" for a causal LM (QLoRA-style over
    # a frozen base, docs/method.md "Language models"), "full" for classification; resolved by
    # the config that knows data.task (resolve_adapter)
    adapter: Literal["auto", "full", "lora"] = "auto"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    # the ExecuTorch runtime's training programs (agent runtime = "executorch"): unset, every
    # expert runs on every token ("dense", exact); a factor f, each expert runs on at most
    # ceil(f * tokens * top_k / num_experts) token rows (about f * top_k / num_experts of the
    # dense expert work) and the routed tokens past that are dropped ("capacity")
    executorch_capacity_factor: float | None = None

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "train.batch_size must be >= 1")
        _check(self.lr > 0, "train.lr must be > 0")
        _check(self.head_lr >= 0, "train.head_lr must be >= 0 (0: train.lr)")
        _check(self.local_epochs >= 1, "train.local_epochs must be >= 1")
        _check(self.max_steps >= 0, "train.max_steps must be >= 0")
        _check(self.threads >= 0, "train.threads must be >= 0")
        _check(self.selection_batches >= 0, "train.selection_batches must be >= 0 (0: all)")
        _check(self.min_experts >= 0, "train.min_experts must be >= 0")
        _check(self.adapter in ("auto", "full", "lora"),
               "train.adapter must be 'auto', 'full' or 'lora'")
        _check(self.lora_rank >= 1, "train.lora_rank must be >= 1")
        _check(self.lora_alpha > 0, "train.lora_alpha must be > 0")
        _check(self.executorch_capacity_factor is None
               or 0 < self.executorch_capacity_factor < float("inf"),
               f"train.executorch_capacity_factor must be a number > 0 (unset: dense experts), "
               f"got {self.executorch_capacity_factor}")
        _check(not (self.adapter == "lora" and self.reselect == "batch"),
               "train.adapter = 'lora' trains one expert set per round (train.reselect = 'round')")


@dataclass(frozen=True)
class KitConfig:
    """Top-level configuration shared by the CLIs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", resolve_adapter(self.train, self.data.task))
        check_quantize_adapter(self.model, self.train)


def resolve_adapter(train: TrainConfig, task: str) -> TrainConfig:
    """``train`` with ``adapter = "auto"`` made ``"lora"`` for a causal LM and ``"full"``
    for classification (an explicit adapter is kept)."""
    if train.adapter != "auto":
        return train
    return dataclasses.replace(train, adapter="lora" if task == "causal-lm" else "full")


def quantize_adapter_problem(quantize: str, adapter: str) -> str | None:
    """Why ``model.quantize`` and ``train.adapter`` do not go together, or None.

    A quantized base is frozen, so only LoRA factors can train over it (docs/method.md)."""
    if quantize == "none" or adapter == "lora":
        return None
    return (f"model.quantize = {quantize!r} stores the experts' base weights quantized and "
            f"frozen, so train.adapter = {adapter!r} cannot train them: set "
            f"train.adapter = \"lora\" or model.quantize = \"none\"")


def check_quantize_adapter(model: ModelConfig, train: TrainConfig) -> None:
    problem = quantize_adapter_problem(model.quantize, train.adapter)
    _check(problem is None, problem or "")


# ---------------------------------------------------------------------------------------------
# Generic loading


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where lossless."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a table, got {type(value).__name__}")
        return from_dict(tp, value, prefix=path)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a table, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a mapping, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in [{prefix}]" if prefix else ""
        raise ConfigError(f"unknown config key(s){where}: {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the key check above
        raise ConfigError(str(exc)) from exc


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (for logging and for the wire)."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value``; the value is read as TOML, else taken as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b=value`` override applied."""
    out: dict[str, Any] = _deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {p} is not a table")
            node = child
        node[parts[-1]] = value
    return out


def _deepcopy(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {p}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from exc


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: Iterable[str] = ()) -> T:
    """Load ``cls`` from an optional TOML file plus ``--set`` overrides."""
    data = read_toml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))
